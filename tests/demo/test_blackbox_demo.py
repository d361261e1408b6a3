"""DE-CAM on the demo's two models exported to ONNX (no gradient access) tells the same story as
Grad-CAM on the torch models: the gate verdicts agree, the run-level ratios agree, and over the images
of both models the per-image ratios rank alike (Spearman >= 0.7).

Within one model they rank alike far less, and the test pins down why that is no criterion: on the
clean model not even Grad-CAM++ on the same layer ranks the images like Grad-CAM (Spearman -0.09 on
the last run), so there is no per-image order to reproduce; on the shortcut model the gradient
methods agree (Grad-CAM++ 0.87) and DE-CAM only weakly (0.37): DE-CAM supports the run's verdict, not
a per-image triage. The figures are printed; docs/decam.md has the wider comparison."""
import csv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "demo" / "cache"  # shared with `make demo`: trained models are reused
N = 60  # test images per model (DE-CAM costs `budget` forward passes each)
BUDGET = 256


@pytest.mark.slow
def test_decam_on_onnx_exports_agrees_with_gradcam_on_the_demo_models(tmp_path):
    import torch
    from scipy.stats import spearmanr

    from camgate.demo.main import POLICY
    from camgate.demo.train import train
    from camgate.gating.decision import gate
    from camgate.io import results
    from camgate.model.load import load_model
    from camgate.runner.heatmaps import run

    # the demo's verdict rules; its trust rules need ROAD and sanity files, which compare other things
    rules = {k: v for k, v in POLICY["rules"].items() if k not in ("faithfulness", "sanity")}
    policy = {**POLICY, "rules": {**rules, "min_images": N // 2}}
    verdicts, rhos, siblings, means, pooled = {}, {}, {}, {}, ([], [])
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
        sibling = run(lm, str(manifest), str(tmp_path / f"{variant}-gradcampp.parquet"), method="gradcam++",
                      progress=False)
        black = run(str(onnx_card), str(manifest), str(tmp_path / f"{variant}-decam.parquet"), method="decam",
                    budget=BUDGET, device="cpu", progress=False)
        a, b, c = results.read(grad.out), results.read(black.out), results.read(sibling.out)
        assert (a["predicted_class"] == b["predicted_class"]).all()  # the export is the same model
        ok = (a["status"] == "ok") & (b["status"] == "ok") & (c["status"] == "ok")
        ra, rb = a.loc[ok, "invalid_activation_ratio"], b.loc[ok, "invalid_activation_ratio"]
        rhos[variant] = spearmanr(ra, rb)[0]
        siblings[variant] = spearmanr(ra, c.loc[ok, "invalid_activation_ratio"])[0]
        means[variant] = (ra.mean(), rb.mean())
        pooled[0].extend(ra)
        pooled[1].extend(rb)
        verdicts[variant] = (gate(grad.out, policy).passed, gate(black.out, policy).passed)
    rho = spearmanr(*pooled)[0]
    print(f"DE-CAM on ONNX vs Grad-CAM on torch, {N} images per model: Spearman over both models {rho:.3f}, "
          f"within each {rhos} (Grad-CAM++ on torch: {siblings}); mean ratios (Grad-CAM, DE-CAM) {means}; "
          f"verdicts {verdicts}")
    # Asserted: what holds for models trained on any machine, with a wide margin. The figures the
    # check reads (pooled Spearman >= 0.7: 0.745 on 120 images; Grad-CAM++ vs Grad-CAM within the
    # shortcut model 0.87, and 0.694 with models trained elsewhere) are printed above, not asserted:
    # a threshold at the edge of a freshly trained model's property is a coin toss for every run.
    assert verdicts == {"clean": (True, True), "shortcut": (False, False)}
    assert rho >= 0.5  # the models' images separate: DE-CAM ranks them as Grad-CAM does across models
    # within a model: the clean model's images have no order the gradient methods agree on (-0.28..0.33
    # measured); the shortcut model's they do (0.69..0.87), and DE-CAM follows it only weakly
    assert siblings["shortcut"] > siblings["clean"] + 0.2
    assert rhos["shortcut"] > 0
    for grad_mean, black_mean in means.values():
        assert abs(grad_mean - black_mean) < 0.15
