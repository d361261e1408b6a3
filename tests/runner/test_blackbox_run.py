"""Black-box models through the product: model cards of kind onnx / callable, the methods decam and rise
in ``run`` / ``analyze`` / the CLI / the KFP components, and the load-time errors (exit 2).

Real onnxruntime sessions of a tiny CNN exported from tests/zoo.py, 32 x 32 inputs."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import make_set
from zoo import tiny_cnn

from camgate.cli import main
from camgate.errors import ModelCardError
from camgate.io import results
from camgate.model.card import ModelCard
from camgate.model.load import load_model
from camgate.runner.analysis import analyze
from camgate.runner.heatmaps import Runner, run

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # legacy TorchScript exporter
              pytest.mark.usefixtures("one_thread")]  # many small ops: one torch thread


def export(model, path: Path, size=(32, 32)) -> Path:
    torch.onnx.export(model.eval(), torch.zeros(1, 3, *size), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return path


def write_card(folder: Path, name: str, **card) -> str:
    card = {"name": name, "num_classes": 3, "classes": ["a", "b", "c"], "input": {"size": [32, 32]}, **card}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(card))
    return str(folder / f"{name}.yaml")


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """Six images with masks, tiny_cnn as an ONNX file (relative to its card) and as a callable."""
    root = tmp_path_factory.mktemp("bb")
    _, manifest = make_set(root, n=6)
    (root / "models").mkdir()
    export(tiny_cnn(), root / "models" / "tiny.onnx")
    return {"root": root, "manifest": manifest,
            "onnx": write_card(root, "onnx", kind="onnx", weights="models/tiny.onnx"),
            "callable": write_card(root, "callable", kind="callable", arch="zoo:tiny_probs", output="probs")}


def rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_onnx_card_run_decam(bb, tmp_path):
    out = tmp_path / "r.parquet"
    s = run(bb["onnx"], bb["manifest"], str(out), method="decam", batch_size=4, progress=False)
    assert s.rows == 6 and s.counts["ok"] == 6
    t = pq.read_table(out)
    got = t.to_pylist()
    assert [r["row"] for r in got] == list(range(6)) and [r["image_id"] for r in got] == [f"{i:03d}" for i in range(6)]
    for r in got:
        assert r["status"] == "ok" and r["method"] == "decam" and r["target_layer"] is None
        assert (r["cam_height"], r["cam_width"]) == (7, 7)  # DE-CAM's grid: stored raw like any map
        cam = results.cam_array(r)
        assert np.isfinite(cam).all() and (cam >= 0).all() and cam.max() > 0
        assert 0 <= r["invalid_activation_ratio"] <= 1 and r["predicted_label"] in ("a", "b", "c")
    md = results.run_metadata(t)
    weights = bb["root"] / "models" / "tiny.onnx"
    assert md["method"] == "decam" and md["target_layer"] == []
    assert md["model"]["kind"] == "onnx" and md["model"]["output"] == "logits"
    assert md["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # the same model as a torch module gives the same predictions (log-probabilities -> softmax)
    spec = load_model(bb["onnx"]).input
    with torch.no_grad():
        x = torch.stack([spec.image_tensor(_image(bb, i)) for i in range(6)])
        ref = tiny_cnn().eval()(x).softmax(1)
    assert [r["predicted_class"] for r in got] == ref.argmax(1).tolist()
    np.testing.assert_allclose([r["predicted_score"] for r in got], ref.max(1).values.numpy(), atol=1e-5)


def _image(bb, i):
    from PIL import Image

    return Image.open(bb["root"] / "images" / f"{i:03d}.png").convert("RGB")


def test_heatmaps_only_then_analyze_equals_fused(bb, tmp_path):
    run(bb["onnx"], bb["manifest"], str(tmp_path / "fused.parquet"), method="decam", progress=False)
    run(bb["onnx"], bb["manifest"], str(tmp_path / "h.parquet"), method="decam", analyze=False, progress=False)
    h = pq.read_table(tmp_path / "h.parquet")
    assert h.column("invalid_activation_ratio").null_count == 6
    analyze(str(tmp_path / "h.parquet"), str(tmp_path / "r.parquet"), data=bb["manifest"], progress=False)
    a, b = rows(tmp_path / "fused.parquet"), rows(tmp_path / "r.parquet")
    assert [r["status"] for r in b] == ["ok"] * 6 and [r["cam"] for r in a] == [r["cam"] for r in b]
    for key in ("invalid_activation_ratio", "topk_invalid_share", "invalid_area_ratio"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], atol=1e-6, rtol=0)


def test_maps_depend_on_seed_and_row_only(bb, tmp_path):
    """Same seed: identical maps, whatever the batch size (each image is seeded from its row)."""
    run(bb["onnx"], bb["manifest"], str(tmp_path / "b6.parquet"), method="decam", analyze=False, batch_size=6,
        progress=False)
    run(bb["onnx"], bb["manifest"], str(tmp_path / "b6again.parquet"), method="decam", analyze=False,
        batch_size=6, progress=False)
    run(bb["onnx"], bb["manifest"], str(tmp_path / "b2.parquet"), method="decam", analyze=False, batch_size=2,
        progress=False)
    maps = [[results.cam_array(r) for r in rows(tmp_path / n)] for n in ("b6.parquet", "b6again.parquet",
                                                                         "b2.parquet")]
    for a, b, c in zip(*maps):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert len({m.tobytes() for m in maps[0]}) == 6  # six images, six different maps


def test_runner_budget_and_seed(bb):
    """Runner(budget=, seed=): exactly budget masked passes per image plus one clean pass; another seed,
    another map; a per-row seed makes an image's map independent of its batch mates."""
    from camgate.data.batches import iter_batches
    from camgate.data.decode import MaskSpec
    from camgate.data.manifest import load_items

    lm = load_model(bb["onnx"])
    items = load_items(bb["manifest"])
    batch = next(iter(iter_batches(items, lm.input, MaskSpec(), 6, workers=1, with_masks=False)))
    calls = lm.backend.calls
    a = Runner(lm, "rise", analyze=False, budget=64).process(batch)
    assert lm.backend.calls - calls == 6 * (64 + 1)
    b = Runner(lm, "rise", analyze=False, budget=64, seed=1).process(batch)
    alone = Runner(lm, "rise", analyze=False, budget=64).process(batch[3:4])
    assert all(r["status"] == "ok" for r in a + b) and (a[0]["cam_height"], a[0]["cam_width"]) == (32, 32)
    assert a[3]["cam"] == alone[0]["cam"] and all(x["cam"] != y["cam"] for x, y in zip(a, b))
    with pytest.raises(ValueError, match="budget"):
        Runner(lm, "decam", budget=0)


def test_gradient_method_on_a_black_box_exits_2(bb, tmp_path, capsys):
    # the data does not exist: an exit 2 naming the method shows the check ran before data was read
    args = ["run", "--model", bb["onnx"], "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.parquet")]
    assert main(args + ["--method", "gradcam"]) == 2
    err = capsys.readouterr().err
    assert "gradcam" in err and "decam" in err and "rise" in err and "nope.csv" not in err
    assert main(args + ["--method", "decam", "--target-layer", "features.2"]) == 2
    assert "target layer" in capsys.readouterr().err
    assert main(args + ["--method", "decam"]) == 2  # the card is fine: now the missing data is the error
    assert "nope.csv" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_broken_onnx_models_exit_2_at_load(bb, tmp_path, capsys):
    from torch import nn

    (tmp_path / "corrupt.onnx").write_bytes((bb["root"] / "models" / "tiny.onnx").read_bytes()[:200])
    export(tiny_cnn().features, tmp_path / "features.onnx")  # (B, 8, 8, 8): not a classifier
    export(nn.Sequential(tiny_cnn().features, nn.Flatten(), nn.Linear(8 * 16 * 16, 3)), tmp_path / "big.onnx",
           size=(64, 64))  # a fixed 64 x 64 input, the card says 32 x 32
    cases = {"corrupt": "cannot load ONNX model", "features": "is not a classifier",
             "big": "expects input (B, 3, 64, 64), but the card's input is (B, 3, 32, 32)",
             "missing": "cannot read ONNX model"}
    for name, reason in cases.items():
        card = write_card(tmp_path, name, kind="onnx", weights=f"{name}.onnx")
        assert main(["run", "--model", card, "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.pq"),
                     "--method", "decam"]) == 2, name
        err = capsys.readouterr().err
        assert reason in err and "nope.csv" not in err, err
    card = write_card(tmp_path, "c2", kind="onnx", weights="corrupt.onnx")
    with pytest.raises(ModelCardError, match=r"corrupt\.onnx"):  # the file, not '<bytes>'
        load_model(card)


def test_card_kinds_are_validated():
    base = {"name": "m", "num_classes": 3}
    assert ModelCard.from_dict({**base, "arch": "zoo:tiny_cnn"}).kind == "torch"
    assert ModelCard.from_dict({**base, "kind": "onnx", "weights": "m.onnx"}).arch is None
    for bad, match in [({"kind": "tflite", "weights": "m"}, "kind must be one of"),
                       ({"kind": "onnx"}, r"misses required keys \['weights'\]"),
                       ({"kind": "callable"}, r"misses required keys \['arch'\]"),
                       ({"kind": "onnx", "weights": "m.onnx", "output": "scores"}, "output must be one of"),
                       ({"arch": "zoo:tiny_cnn", "output": "probs"}, "must return logits"),
                       ({"kind": "onnx", "weights": "m.onnx", "target_layer": "layer4"}, "does not take"),
                       ({"kind": "callable", "arch": "zoo:tiny_probs", "weights": "w.pt"}, "does not take")]:
        with pytest.raises(ModelCardError, match=match):
            ModelCard.from_dict({**base, **bad})


def test_method_names():
    from camgate.cam import CamEngine, MethodError, canonical, methods

    assert canonical("DECAM") == "decam" and canonical("RISE") == "rise"
    assert {"decam", "rise", "gradcam"} <= set(methods())
    with pytest.raises(MethodError, match="black-box"):
        CamEngine(tiny_cnn(), [], "decam")


def test_callable_card_with_probs(bb, tmp_path):
    lm = load_model(bb["callable"])
    assert lm.model is None and lm.backend.kind == "callable" and lm.metadata()["output"] == "probs"
    run(lm, bb["manifest"], str(tmp_path / "c.parquet"), method="decam", progress=False)
    run(bb["onnx"], bb["manifest"], str(tmp_path / "o.parquet"), method="decam", progress=False)
    c, o = rows(tmp_path / "c.parquet"), rows(tmp_path / "o.parquet")
    assert [r["status"] for r in c] == ["ok"] * 6
    # the same network behind a function and behind onnxruntime: the same predictions and close maps
    assert [r["predicted_class"] for r in c] == [r["predicted_class"] for r in o]
    np.testing.assert_allclose([r["predicted_score"] for r in c], [r["predicted_score"] for r in o], atol=1e-5)
    for a, b in zip(c, o):
        np.testing.assert_allclose(results.cam_array(a), results.cam_array(b), atol=1e-3)


def test_torch_card_with_rise(bb, tmp_path):
    from safetensors.torch import save

    (tmp_path / "w.safetensors").write_bytes(save(tiny_cnn().state_dict()))
    card = write_card(tmp_path, "torch", arch="zoo:tiny_cnn", weights="w.safetensors")
    run(card, bb["manifest"], str(tmp_path / "t.parquet"), method="rise", progress=False)
    run(bb["onnx"], bb["manifest"], str(tmp_path / "o.parquet"), method="rise", progress=False)
    t, o = rows(tmp_path / "t.parquet"), rows(tmp_path / "o.parquet")
    assert [r["status"] for r in t] == ["ok"] * 6 and {r["method"] for r in t} == {"rise"}
    assert all((r["cam_height"], r["cam_width"]) == (32, 32) and r["target_layer"] is None for r in t)
    # through outputs only, a torch module and its ONNX export give the same RISE maps
    for a, b in zip(t, o):
        np.testing.assert_allclose(results.cam_array(a), results.cam_array(b), atol=1e-4)


def test_kfp_components_on_an_onnx_card(bb, tmp_path):
    pytest.importorskip("kfp")
    from kfp import dsl

    from camgate.kfp import analyze_invalid_activation, compute_heatmaps
    from camgate.kfp import load_model as load_component

    model = dsl.Model(uri=str(tmp_path / "model"))
    load_component.python_func(model_card=bb["onnx"], model=model)
    resolved = json.loads(Path(model.path).read_text())
    weights = bb["root"] / "models" / "tiny.onnx"
    assert resolved["kind"] == "onnx" and resolved["weights"] == str(weights)
    assert model.metadata["kind"] == "onnx" and model.metadata["target_layer"] == []
    assert model.metadata["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    heat = dsl.Dataset(uri=str(tmp_path / "heatmaps"))
    compute_heatmaps.python_func(model=model, data=bb["manifest"], heatmaps=heat, method="decam", batch_size=4,
                                 device="cpu")
    assert heat.metadata["rows"] == 6 and heat.metadata["method"] == "decam"
    res = dsl.Dataset(uri=str(tmp_path / "results"))
    analyze_invalid_activation.python_func(heatmaps=heat, results=res, data=bb["manifest"])
    got = rows(res.path)
    assert [r["status"] for r in got] == ["ok"] * 6 and {r["method"] for r in got} == {"decam"}
    # the pipeline path gives what the CLI path gives
    run(bb["onnx"], bb["manifest"], str(tmp_path / "cli.parquet"), method="decam", progress=False)
    np.testing.assert_allclose([r["invalid_activation_ratio"] for r in got],
                               [r["invalid_activation_ratio"] for r in rows(tmp_path / "cli.parquet")], atol=1e-6)
