"""The numbers a user sees are the numbers the library computes: the split (pipeline) path equals the
fused (CLI) path, masks pair by row and image, configuration errors fail before data is read, exit
codes tell a failed gate from a bug, and per-row artifacts are keyed by row."""
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_set, png, zoo_card

from camgate.cli import main
from camgate.data.manifest import DataError
from camgate.io import results
from camgate.runner.analysis import analyze
from camgate.runner.heatmaps import run

METRICS = ["invalid_activation_ratio", "invalid_area_ratio", "topk_invalid_share"]




def split(card, manifest, tmp_path, **analyze_kw):
    heat, out = str(tmp_path / "h.parquet"), str(tmp_path / "split.parquet")
    run(card, manifest, heat, analyze=False, progress=False)
    analyze(heat, out, progress=False, **analyze_kw)
    return pq.read_table(out)


# --------------------------------------------------------------------------- 1. split == fused


def test_stored_maps_round_trip_bit_for_bit():
    rng = np.random.default_rng(0)
    cam = (rng.random((7, 9)) * 10.0 ** rng.integers(-30, 30, (7, 9))).astype(np.float32)
    row = {"cam": results.cam_bytes(cam), "cam_height": 7, "cam_width": 9}
    assert np.array_equal(results.cam_array(row), cam)
    # files written before float32 maps hold float16; the one decoder reads both
    old = {"cam": cam.clip(0, 60000).astype(np.float16).tobytes(), "cam_height": 7, "cam_width": 9}
    assert np.array_equal(results.cam_array(old), cam.clip(0, 60000).astype(np.float16).astype(np.float32))


def test_split_path_equals_fused_path_to_1e6(tmp_path):
    card, manifest = make_set(tmp_path, n=12)
    fused = pq.read_table(run(card, manifest, str(tmp_path / "fused.parquet"), progress=False).out)
    other = split(card, manifest, tmp_path)  # no --data: the masks recorded in the heatmaps file
    assert other.column("status").to_pylist() == fused.column("status").to_pylist() == ["ok"] * 12
    assert other.column("row").to_pylist() == list(range(12))
    for col in METRICS:
        delta = np.abs(fused.column(col).to_numpy() - other.column(col).to_numpy()).max()
        assert delta <= 1e-6, f"{col}: split path differs by {delta:.2e}"
    assert other.column("peak_in_invalid").to_pylist() == fused.column("peak_in_invalid").to_pylist()
    assert other.column("cam").to_pylist() == fused.column("cam").to_pylist()


def test_faint_map_is_active_on_both_paths(tmp_path):
    """Maps of ~1e-9 are real maps; stored as float16 they would flush to zero on one path only."""
    _, manifest = make_set(tmp_path, n=4)
    card = zoo_card(tmp_path, "faint_net")
    fused = pq.read_table(run(card, manifest, str(tmp_path / "f.parquet"), progress=False).out)
    other = split(card, manifest, tmp_path)
    cams = [results.cam_array(r) for r in fused.to_pylist()]
    assert 0 < max(c.max() for c in cams) < 6e-8  # below float16's smallest subnormal
    assert fused.column("status").to_pylist() == other.column("status").to_pylist() == ["ok"] * 4
    np.testing.assert_allclose(fused.column("invalid_activation_ratio").to_numpy(),
                               other.column("invalid_activation_ratio").to_numpy(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- 2./3. masks: recorded, paired


def test_analyze_without_data_uses_the_recorded_static_mask(tmp_path):
    card, manifest = make_set(tmp_path, n=5)
    wall = np.zeros((40, 50), np.uint8)
    wall[:20] = 255
    (tmp_path / "wall.png").write_bytes(png(wall))
    sm = str(tmp_path / "wall.png")
    fused = pq.read_table(run(card, manifest, str(tmp_path / "f.parquet"), static_mask=sm, progress=False).out)
    heat, out = str(tmp_path / "h.parquet"), str(tmp_path / "a.parquet")
    run(card, manifest, heat, analyze=False, static_mask=sm, progress=False)
    analyze(heat, out, progress=False)
    got = pq.read_table(out)
    assert got.column("mask").to_pylist() == [sm] * 5
    assert got.column("invalid_activation_ratio").to_pylist() == fused.column("invalid_activation_ratio").to_pylist()


def test_heatmaps_keep_mask_uris(tmp_path):
    card, manifest = make_set(tmp_path, n=3)
    run(card, manifest, str(tmp_path / "h.parquet"), analyze=False, progress=False)
    h = pq.read_table(tmp_path / "h.parquet")
    assert h.column("mask").to_pylist() == [str(tmp_path / "masks" / f"{i:03d}.png") for i in range(3)]
    assert h.column("invalid_activation_ratio").null_count == 3  # not analysed yet


def test_analyze_refuses_a_manifest_that_does_not_match(tmp_path, capsys):
    card, manifest = make_set(tmp_path, n=6)
    heat = str(tmp_path / "h.parquet")
    run(card, manifest, heat, analyze=False, progress=False)
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    (tmp_path / "reordered.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    with pytest.raises(DataError, match=r"row 0 is .*005\.png in the manifest but .*000\.png in the heatmaps"):
        analyze(heat, str(tmp_path / "r.parquet"), data=str(tmp_path / "reordered.csv"), progress=False)
    assert not (tmp_path / "r.parquet").exists()
    (tmp_path / "short.csv").write_text("\n".join(lines[:4]) + "\n")
    assert main(["analyze", heat, "--out", str(tmp_path / "r.parquet"), "--data", str(tmp_path / "short.csv"),
                 "--quiet"]) == 2
    assert "has 3 items but heatmaps" in capsys.readouterr().err
    # the same manifest, with other mask files: paired by row and image, the new masks are used
    (tmp_path / "masks2").mkdir()
    for i in range(6):
        (tmp_path / "masks2" / f"{i:03d}.png").write_bytes(png(np.full((8, 8), 255, np.uint8)))
    (tmp_path / "remask.csv").write_text((tmp_path / "manifest.csv").read_text().replace("masks/", "masks2/"))
    analyze(heat, str(tmp_path / "r.parquet"), data=str(tmp_path / "remask.csv"), progress=False)
    assert pq.read_table(tmp_path / "r.parquet").column("invalid_activation_ratio").to_pylist() == [1.0] * 6


# --------------------------------------------------------------------------- 4./5. configuration found at load


def test_vit_with_other_patch_sizes(tmp_path):
    import torch

    from camgate.cam import CamEngine
    from camgate.model.card import ModelCard
    from camgate.model.load import load_model

    lm = load_model(ModelCard.from_dict({"name": "v", "arch": "torchvision/vit_b_32", "num_classes": 3}), device="cpu")
    torch.nn.init.normal_(lm.model.heads.head.weight, generator=torch.Generator().manual_seed(0))  # zero-initialised
    cams = CamEngine(lm.model, lm.layers(), "gradcam", lm.reshape_transform)(torch.randn(2, 3, 224, 224)).cams
    assert cams.shape == (2, 7, 7) and cams.flatten(1).amax(1).gt(0).all()  # 32 px patches: a 7x7 grid
    _, manifest = make_set(tmp_path, n=2)
    card = zoo_card(tmp_path, "vit_patch14", size=56, reshape="vit")  # 14 px patches: a 4x4 grid, through `run`
    t = pq.read_table(run(card, manifest, str(tmp_path / "v.parquet"), progress=False).out)
    assert t.column("status").to_pylist() == ["ok"] * 2, t.column("error").to_pylist()
    assert (t.column("cam_height")[0].as_py(), t.column("cam_width")[0].as_py()) == (4, 4)


@pytest.mark.parametrize("factory, layer, message", [
    ("tiny_cnn", "head", r"target layer 'head' gives shape \(1, 3\), not a spatial map"),
    ("tuple_net", "pair", r"target layer 'pair' returns a tuple, not a tensor"),
])
def test_unusable_target_layer_fails_before_any_data_is_read(tmp_path, factory, layer, message, capsys):
    card = zoo_card(tmp_path, factory, target_layer=layer)
    missing = str(tmp_path / "nowhere.csv")  # reading the data first would report this instead
    assert main(["run", "--model", card, "--data", missing, "--out", str(tmp_path / "r.parquet")]) == 2
    err = capsys.readouterr().err
    assert "candidates" in err and "features.2" in err and "nowhere" not in err
    import re

    assert re.search(message, err), err


def test_a_layer_that_runs_twice_is_refused(tmp_path, capsys):
    card, _ = make_set(tmp_path, n=1)
    assert main(["run", "--model", card, "--data", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "r.pq"),
                 "--target-layer", "layer1.0.relu"]) == 2
    assert "'layer1.0.relu' runs 2 times in one forward" in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. exit codes


def test_internal_errors_exit_3_and_say_it_is_a_bug(tmp_path, monkeypatch, capsys):
    import camgate.runner

    card, manifest = make_set(tmp_path, n=1)

    def broken(*a, **k):
        raise ValueError("an internal inconsistency")  # a bug, whatever its type

    monkeypatch.setattr(camgate.runner, "run", broken)
    assert main(["run", "--model", card, "--data", manifest, "--out", str(tmp_path / "r.parquet")]) == 3
    err = capsys.readouterr().err
    assert "internal error (a bug" in err and "ValueError: an internal inconsistency" in err
    assert "Traceback" not in err and "--debug" in err
    assert main(["--debug", "run", "--model", card, "--data", manifest, "--out", str(tmp_path / "r.parquet")]) == 3
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.undo()
    # a stated user error stays 2
    assert main(["run", "--model", card, "--data", manifest, "--out", "x.parquet", "--topk", "2"]) == 2
    assert "topk must be in (0, 1]" in capsys.readouterr().err


# --------------------------------------------------------------------------- 7. per-row artifacts


def test_report_overlays_are_keyed_by_row_not_image_id(tmp_path):
    from camgate import report
    from camgate.data.geometry import InputSpec
    from camgate.io import storage

    rng = np.random.default_rng(3)
    lines = ["image,mask"]
    for folder in ("a", "b"):  # one stem in two folders, plus a duplicate row
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
        (tmp_path / folder / "m.png").write_bytes(png(np.tri(40, dtype=np.uint8) * 255))
        lines.append(f"{folder}/x.png,{folder}/m.png")
    lines.append("a/x.png,a/m.png")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    card, _ = make_set(tmp_path / "set", n=1)
    out = str(tmp_path / "r.parquet")
    run(card, str(tmp_path / "m.csv"), out, progress=False)
    rows = pq.read_table(out).to_pylist()
    assert [r["image_id"] for r in rows] == ["x", "x", "x"]
    pics = report.overlays(out, top=3)
    assert sorted(pics) == [0, 1, 2]
    spec = InputSpec(size=(64, 64))
    for r in rows:
        from camgate.data.decode import MaskSpec, decode_mask, model_view

        size = (r["image_width"], r["image_height"])
        mask = model_view(decode_mask(storage.read_bytes(r["mask"]), r["mask"], MaskSpec(), size), spec, size)
        own = report.overlay_png(storage.read_bytes(r["image"]), results.cam_array(r), spec.box(*size), mask)
        assert pics[r["row"]] == own
    assert pics[0] != pics[1]  # two different pictures behind one image id


# --------------------------------------------------------------------------- 9. no_activation


def test_many_all_zero_maps_fail_the_gate_by_default():
    from camgate.gating.decision import gate

    n = 200
    status = ["no_activation"] * 198 + ["ok"] * 2
    table = pa.table({"status": status, "invalid_activation_ratio": [math.nan] * 198 + [0.1, 0.1],
                      "invalid_area_ratio": [0.5] * n, "peak_in_invalid": [None] * 198 + [False, False]})
    d = gate(table, {"rules": {"mean_invalid_activation_ratio": {"max": 0.3}}})
    assert not d.passed and [r.rule for r in d.failed] == ["no_activation_rate"]
    assert d.failed[0].threshold == 0.05 and d.failed[0].value == pytest.approx(0.99)
    assert gate(table, {"rules": {"mean_invalid_activation_ratio": {"max": 0.3}, "no_activation_rate": None}}).passed


# --------------------------------------------------------------------------- 11. one call to a DataFrame


def test_results_read_gives_a_dataframe(tmp_path):
    import pandas as pd

    card, manifest = make_set(tmp_path, n=4)
    out = run(card, manifest, str(tmp_path / "r.parquet"), progress=False).out
    df = results.read(out)
    assert isinstance(df, pd.DataFrame) and list(df["row"]) == [0, 1, 2, 3]
    assert df.attrs["camgate"]["method"] == "gradcam"
    assert results.cam_array(df.iloc[0]).shape == (4, 4)
    assert df["invalid_activation_ratio"].between(0, 1).all()
