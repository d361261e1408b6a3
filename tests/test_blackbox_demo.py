"""DE-CAM on the demo's two models exported to ONNX (no gradient access) tells the same story as
Grad-CAM on the torch models: per-image invalid ratios rank alike and the gate verdicts agree."""
import csv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo" / "cache"  # shared with `make demo`: trained models are reused
N = 60  # test images per model (DE-CAM costs `budget` forward passes each)
BUDGET = 256


@pytest.mark.slow
def test_decam_on_onnx_exports_agrees_with_gradcam_on_the_demo_models(tmp_path):
    import torch
    from scipy.stats import spearmanr

    from camgate import results
    from camgate.demo.main import POLICY
    from camgate.demo.train import train
    from camgate.gate import gate
    from camgate.modelspec import load_model
    from camgate.runner import run

    policy = {**POLICY, "rules": {**POLICY["rules"], "min_images": N // 2}}
    verdicts, rhos = {}, {}
    for variant in ("clean", "shortcut"):
        card_path = train(variant, CACHE)
        card = yaml.safe_load(card_path.read_text())
        metrics = yaml.safe_load((card_path.parent / "metrics.json").read_text())
        test_csv = (card_path.parent / metrics["data"]).resolve()
        with open(test_csv, newline="") as f:
            rows = list(csv.reader(f))
        manifest = tmp_path / f"{variant}.csv"
        with open(manifest, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [[str(test_csv.parent / c) if c.endswith(".png") else c for c in r]
                                                 for r in rows[1:N + 1]])
        lm = load_model(str(card_path), device="cpu")
        onnx_path = tmp_path / f"{variant}.onnx"
        torch.onnx.export(lm.model, torch.zeros(1, 3, *card["input"]["size"]), str(onnx_path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
        onnx_card = tmp_path / f"{variant}-onnx.yaml"
        onnx_card.write_text(yaml.safe_dump({"name": f"{variant}-onnx", "kind": "onnx", "weights": onnx_path.name,
                                             "num_classes": card["num_classes"], "classes": card["classes"],
                                             "input": card["input"]}))
        grad = run(lm, str(manifest), str(tmp_path / f"{variant}-gradcam.parquet"), progress=False)
        black = run(str(onnx_card), str(manifest), str(tmp_path / f"{variant}-decam.parquet"), method="decam",
                    budget=BUDGET, device="cpu", progress=False)
        a, b = results.read(grad.out), results.read(black.out)
        assert (a["predicted_class"] == b["predicted_class"]).all()  # the export is the same model
        ok = (a["status"] == "ok") & (b["status"] == "ok")
        rhos[variant] = spearmanr(a.loc[ok, "invalid_activation_ratio"], b.loc[ok, "invalid_activation_ratio"])[0]
        verdicts[variant] = (gate(grad.out, policy).passed, gate(black.out, policy).passed)
    print(f"Spearman (DE-CAM on ONNX vs Grad-CAM on torch), {N} images each: {rhos}; verdicts "
          f"(Grad-CAM, DE-CAM): {verdicts}")
    assert verdicts == {"clean": (True, True), "shortcut": (False, False)}
    assert min(rhos.values()) >= 0.7
