"""The Python API (``camgate.explain``, ``camgate.evaluate``): the numbers of ``camgate run`` + ``gate``,
the caller's module left as it was, every input form giving the same maps, clear errors."""
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

import camgate
from camgate.cli import main
from camgate.errors import ConfigError
from camgate.io import results as res
from camgate.model import load_model

SIZE = 64
LAYER = "layer3"  # 4x4 maps at 64 px
POLICY = {"name": "api-test", "rules": {"mean_invalid_activation_ratio": {"max": 0.5},
                                        "share_images_over": {"ratio": 0.5, "max": 0.5},
                                        "peak_in_invalid_rate": {"max": 0.5}, "mean_excess_over_area": {"max": 0.2},
                                        "no_activation_rate": {"max": 1.0}}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=4).eval()


def pixels(n=6, seed=0):
    """n uint8 images (n, 80, 96, 3) and half-resolution masks (n, 40, 48), top rows invalid."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 80, 96, 3), dtype=np.uint8)
    masks = np.zeros((n, 40, 48), np.uint8)
    for i in range(n):
        masks[i, : 6 + 3 * i] = 255
    return imgs, masks


def png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_set(root: Path, model, imgs, masks):
    """Model card + state_dict weights + PNG images and masks + CSV manifest + policy YAML."""
    torch.save(model.state_dict(), root / "model.pt")
    (root / "card.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "arch": "torchvision/resnet18", "num_classes": 4, "weights": "model.pt",
        "input": {"size": [SIZE, SIZE]}, "target_layer": LAYER}))
    lines = ["image,mask,label"]
    for i, (img, mask) in enumerate(zip(imgs, masks)):
        (root / f"{i:03d}.png").write_bytes(png(img))
        (root / f"m{i:03d}.png").write_bytes(png(mask))
        lines.append(f"{i:03d}.png,m{i:03d}.png,{i % 4}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    return root / "card.yaml", root / "manifest.csv", root / "policy.yaml"


def as_tensor(imgs):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]: the pixels of the PNG files."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255


def test_evaluate_equals_cli_run_and_gate(tmp_path, capsys, one_thread):
    model = tiny_model()
    imgs, masks = pixels()
    card, manifest, policy = write_set(tmp_path, model, imgs, masks)
    out = tmp_path / "r.parquet"
    assert main(["run", "--model", str(card), "--data", str(manifest), "--out", str(out), "--device", "cpu",
                 "--batch-size", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["gate", str(out), "--policy", str(policy), "--compact"]) == 0
    cli_decision = json.loads(capsys.readouterr().out)
    cli = camgate.read_results(str(out))

    df, decision = camgate.evaluate(model, as_tensor(imgs), [m > 0 for m in masks], policy=POLICY,
                                    target_layer=LAYER, input={"size": [SIZE, SIZE]}, labels=[i % 4 for i in range(6)],
                                    image_ids=[f"{i:03d}" for i in range(6)], batch_size=4, device="cpu")
    assert list(df.columns) == list(cli.columns)
    assert df["row"].tolist() == cli["row"].tolist() == list(range(6))
    assert df["status"].tolist() == cli["status"].tolist()
    assert (df["status"] == "ok").sum() >= 3  # the comparison has numbers behind it
    for col in ("predicted_class", "target_class", "cam_height", "cam_width", "label", "image_id", "method",
                "target_layer", "peak_in_invalid"):
        assert df[col].tolist() == cli[col].tolist(), col
    for col in ("invalid_activation_ratio", "invalid_area_ratio", "topk_invalid_share", "predicted_score"):
        a, b = df[col].to_numpy(float), cli[col].to_numpy(float)
        assert np.allclose(a, b, atol=1e-6, rtol=0, equal_nan=True), col
    for i in range(6):
        assert np.allclose(res.cam_array(df.iloc[i]), res.cam_array(cli.iloc[i]), atol=1e-6)
    assert df["image"].isna().all() and df["mask"].isna().all()  # in memory: no URIs
    assert df.attrs["camgate"]["method"] == "gradcam" and df.attrs["camgate"]["target_layer"] == [LAYER]

    got = decision.to_dict()
    assert got["passed"] == cli_decision["passed"]
    assert got["counts"] == cli_decision["counts"]
    assert [(r["rule"], r["scope"], r["verdict"]) for r in got["rules"]] == \
           [(r["rule"], r["scope"], r["verdict"]) for r in cli_decision["rules"]]
    for a, b in zip(got["rules"], cli_decision["rules"]):
        assert (a["value"] is None) == (b["value"] is None)
        assert a["value"] is None or abs(a["value"] - b["value"]) <= 1e-6, a["rule"]

    # the same through the card (path) and files (URIs): the run's own inputs
    df2, d2 = camgate.evaluate(str(card), [str(tmp_path / f"{i:03d}.png") for i in range(6)],
                               [str(tmp_path / f"m{i:03d}.png") for i in range(6)], policy=str(policy), device="cpu")
    assert df2["status"].tolist() == cli["status"].tolist() and d2.passed == cli_decision["passed"]
    assert np.allclose(df2["invalid_activation_ratio"].to_numpy(float), cli["invalid_activation_ratio"].to_numpy(float),
                       atol=1e-6, equal_nan=True)
    assert df2["image"].tolist() == cli["image"].tolist()

    # explain gives the maps evaluate stored
    ex = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input={"size": [SIZE, SIZE]}, device="cpu")
    assert ex.maps.dtype == torch.float32 and ex.maps.shape == (6, 4, 4)
    assert ex.predicted_class.tolist() == cli["predicted_class"].tolist()
    for i in range(6):
        assert np.allclose(ex.maps[i].numpy(), res.cam_array(cli.iloc[i]), atol=1e-6)
    assert torch.allclose(ex.predicted_score, torch.tensor(cli["predicted_score"].to_numpy(np.float32)), atol=1e-6)


def state(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: (p.requires_grad, p.data_ptr(), p.device, id(p)) for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()})


def check_same(model, before):
    after = state(model)
    assert after[1] == before[1]  # requires_grad, the very tensors, device, the Parameter objects
    assert after[2] == before[2]  # training flags of every submodule
    for n, t in before[0].items():
        assert torch.equal(after[0][n], t), n  # parameters and BatchNorm running stats
    for n, g in before[3].items():
        assert (after[3][n] is None) == (g is None) and (g is None or torch.equal(after[3][n], g)), n


def mixed_module():
    model = tiny_model(1)
    model.train()
    model.layer2.eval()  # a mix of modes
    for p in model.layer1.parameters():  # a mix of frozen and trainable
        p.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    return model


def test_module_state_is_left_as_it_was(one_thread):
    model = mixed_module()
    imgs, masks = pixels(4)
    before = state(model)
    for device in ("auto", "cpu"):
        camgate.evaluate(model, as_tensor(imgs), masks, target_layer=LAYER, input=SIZE, device=device)
        check_same(model, before)
        camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE, device=device)
        check_same(model, before)
    camgate.explain(model, as_tensor(imgs), method="rise", budget=8, input=SIZE, target_layer=LAYER)
    check_same(model, before)
    with pytest.raises(ConfigError):  # a failing call restores too
        camgate.explain(model, as_tensor(imgs), target_layer="layer9", input=SIZE)
    check_same(model, before)
    # and the numbers are those of the module in eval mode
    ref = tiny_model(1)
    a = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE)
    b = camgate.explain(ref, as_tensor(imgs), target_layer=LAYER, input=SIZE)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.logits, b.logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_state_on_cuda():
    model = mixed_module()
    imgs, masks = pixels(4)
    before = state(model)
    on_cuda = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE, device="cuda")
    check_same(model, before)  # moved to the GPU and channels_last for the call, back after
    df, _ = camgate.evaluate(model, as_tensor(imgs), masks, target_layer=LAYER, input=SIZE, device="cuda")
    check_same(model, before)
    on_cpu = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE, device="cpu")
    assert torch.allclose(on_cuda.maps, on_cpu.maps, atol=1e-3 * float(on_cpu.maps.max()) + 1e-6)
    model.cuda()
    before = state(model)
    ex = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE)  # auto: where it is
    check_same(model, before)
    assert ex.maps.device.type == "cpu" and df["status"].isin(["ok", "no_activation"]).all()


def test_explain_input_forms_agree_and_bad_input_is_named(tmp_path, one_thread):
    model = tiny_model()
    imgs, masks = pixels(4)
    kw = dict(target_layer=LAYER, input={"size": [SIZE, SIZE]})
    ref = camgate.explain(model, as_tensor(imgs), **kw)
    paths = []
    for i, a in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(a))
    forms = {
        "uint8 tensor": torch.from_numpy(imgs).permute(0, 3, 1, 2),
        "numpy list": list(imgs),
        "numpy float list": [a / 255.0 for a in imgs],
        "numpy batch": imgs,
        "PIL list": [Image.fromarray(a) for a in imgs],
        "tensor list": list(as_tensor(imgs)),
        "float64 tensor": as_tensor(imgs).double(),
        "paths": paths,
        "str URIs": [str(p) for p in paths],
    }
    for name, images in forms.items():
        got = camgate.explain(model, images, **kw)
        assert torch.equal(got.maps, ref.maps), name
        assert torch.equal(got.predicted_class, ref.predicted_class), name
    one = camgate.explain(model, Image.fromarray(imgs[0]), **kw)
    assert torch.allclose(one.maps[0], ref.maps[0], atol=1e-6) and len(one) == 1  # batch of 1: last bits may differ
    assert ref.normalized().shape == (4, SIZE, SIZE) and torch.allclose(ref.probs.sum(1), torch.ones(4))
    t = camgate.explain(model, as_tensor(imgs), target=2, **kw)
    assert t.target_class.tolist() == [2] * 4

    x = as_tensor(imgs)
    cases = [
        (lambda: camgate.explain(model, x[0], **kw), "images"),  # (3, H, W): rank 3
        (lambda: camgate.explain(model, x[:, :2], **kw), "images"),
        (lambda: camgate.explain(model, x * 255, **kw), "images"),  # not pixels in [0, 1]
        (lambda: camgate.explain(model, x, method="no-such-cam", **kw), "method"),
        (lambda: camgate.explain(model, x, target=9, **kw), "target"),
        (lambda: camgate.explain(model, x, labels=[0], target="label", **kw), "labels"),
        (lambda: camgate.explain(model, x, num_classes=3, **kw), "num_classes"),
        (lambda: camgate.explain(model, x, target_layer="nope", input=SIZE), "nope"),
        (lambda: camgate.explain(str(tmp_path / "card.yaml"), x, input=SIZE), "input"),
        (lambda: camgate.evaluate(model, x, masks[:3], **kw), "masks"),
        (lambda: camgate.evaluate(model, x, list(masks)[:3], **kw), "masks"),
        (lambda: camgate.evaluate(model, x, None, **kw), "masks"),
        (lambda: camgate.evaluate(model, x, np.zeros((4, 2, 8, 8)), **kw), "masks"),
        (lambda: camgate.evaluate(model, x, masks, policy={"rules": {"nope": 1}}, **kw), "nope"),
    ]
    for call, word in cases:
        with pytest.raises(ConfigError, match=word):
            call()


def test_evaluate_mask_options_and_errors_per_image(tmp_path, one_thread):
    model = tiny_model()
    imgs, masks = pixels(4)
    kw = dict(target_layer=LAYER, input=SIZE)
    base, _ = camgate.evaluate(model, as_tensor(imgs), masks, **kw)
    inv, _ = camgate.evaluate(model, as_tensor(imgs), [m == 0 for m in masks], invert=True, **kw)
    ids, _ = camgate.evaluate(model, as_tensor(imgs), [(m > 0).astype(np.uint8) * 7 for m in masks],
                              invalid_ids=[7], **kw)
    for other in (inv, ids):
        assert np.allclose(other["invalid_activation_ratio"], base["invalid_activation_ratio"], equal_nan=True)
    static, _ = camgate.evaluate(model, as_tensor(imgs), masks[0], **kw)  # one mask for every image
    assert np.allclose(static["invalid_area_ratio"], base["invalid_area_ratio"].iloc[0])
    # a file that cannot be read is that row's error, as in `camgate run`; the default rules fail the gate
    df, decision = camgate.evaluate(model, [imgs[0], str(tmp_path / "missing.png")], [masks[0], masks[1]],
                                    metadata={"camera": ["a", "b"]}, **kw)
    assert df["status"].tolist()[1] == "error" and "missing.png" in df["error"].iloc[1]
    assert df["camera"].tolist() == ["a", "b"] and df["image"].iloc[1].endswith("missing.png")
    assert not decision.passed and any(r.rule == "error_rate" and r.verdict == "fail" for r in decision.rules)


def test_package_exports():
    assert {"explain", "evaluate", "run", "analyze", "gate", "read_results", "load_model"} <= set(camgate.__all__)
    from camgate import gate
    from camgate.gating import gate as gate_function

    assert gate is gate_function and camgate.run.__module__ == "camgate.runner.heatmaps"
    assert camgate.read_results is res.read and camgate.load_model is load_model
    # import camgate stays cheap: torch only on first use of the API
    code = "import sys, camgate; assert 'torch' not in sys.modules; camgate.gate; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False).stdout.strip() == "ok"


def test_gate_call_equals_gate_function(tmp_path, one_thread):
    model = tiny_model()
    imgs, masks = pixels(4)
    df, decision = camgate.evaluate(model, as_tensor(imgs), masks, target_layer=LAYER, input=SIZE, policy=POLICY)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "r.parquet")
    assert camgate.gate(str(tmp_path / "r.parquet"), POLICY).to_dict() == decision.to_dict()


def test_readme_python_api_example(one_thread):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    results, decision = ns["results"], ns["decision"]
    assert len(results) == 8 and set(results["status"]) <= {"ok", "no_activation"}
    assert ns["ex"].maps.shape[0] == 8 and isinstance(decision.passed, bool)
    assert all(math.isnan(v) or 0 <= v <= 1 for v in results["invalid_activation_ratio"])


def test_module_layout_change_is_undone(monkeypatch, one_thread):
    """On CUDA the runner converts a conv model to channels_last in place: forced here on the CPU,
    the module's own tensors (same storage, same layout) come back after the call."""
    from camgate.data import device as gpu

    force = gpu.channels_last
    monkeypatch.setattr(gpu, "channels_last", lambda model, device, force_=None: force(model, device, True))
    model = mixed_module()
    imgs, masks = pixels(2)
    before = state(model)
    ex = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE)
    check_same(model, before)
    assert model.conv1.weight.is_contiguous()
    monkeypatch.undo()
    ref = camgate.explain(model, as_tensor(imgs), target_layer=LAYER, input=SIZE)
    assert torch.allclose(ex.maps, ref.maps, atol=1e-5)
