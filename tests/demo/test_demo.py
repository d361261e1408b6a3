"""The README's main job, end to end: both models accurate, the shortcut model fails the gate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKDIR = ROOT / ".cache" / "demo"  # shared with `make demo`: trained models are reused


@pytest.mark.slow
def test_demo_clean_passes_shortcut_fails():
    p = subprocess.run([sys.executable, "-m", "camgate.cli", "demo", "--workdir", str(WORKDIR)],
                       capture_output=True, text=True, timeout=3000, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
    assert p.returncode == 0, p.stderr[-4000:]
    print(p.stdout)
    # never silent for minutes: training (or the cache hit) and each pipeline task are announced
    for variant in ("clean", "shortcut"):
        assert f"[demo] {variant}: " in p.stderr
        for task in ("load-model", "plan-shards", "shard-worker", "merge-results", "gate"):
            assert f"[demo] {variant}: Task '{task}' finished with status SUCCESS" in p.stderr, p.stderr[-3000:]
    every = json.loads((WORKDIR / "demo.json").read_text())
    rows = {r["variant"]: r for r in every if r.get("task") is None}
    detectors = {r["variant"]: r for r in every if r.get("task") == "detection"}
    clean, shortcut = rows["clean"], rows["shortcut"]
    assert clean["test_accuracy"] >= 0.9 and shortcut["test_accuracy"] >= 0.9
    assert clean["passed"] and clean["promoted"]
    assert not shortcut["passed"] and not shortcut["promoted"]
    # the model that passed was promoted with its test record; the other was not copied at all
    assert clean["promoted_files"] == ["card.json", "model.safetensors", "record.json"]
    assert shortcut["promoted_files"] == []
    assert shortcut["mean_invalid_activation_ratio"] > clean["mean_invalid_activation_ratio"] + 0.2
    # champion/challenger: the clean model is production; the shortcut model is a regression against it
    assert clean["champion"] is None and clean["regression"] is None
    assert shortcut["champion"] == "underpass-clean" and shortcut["regression"] == "FAIL"
    assert shortcut["baseline_mean_increase"] > 0.2 and "FAIL" in p.stdout.split("underpass-shortcut")[1]
    assert "Task 'champion-results' finished with status SUCCESS" in p.stderr
    # the heatmaps behind the verdicts are faithful: ROAD of Grad-CAM clears the random map by far
    for r in (clean, shortcut):
        assert r["road"] > r["road_random"] + 0.1, r
    # ... and pass both sanity checks: they change when the weights are randomised and between classes
    print({v: (r["randomised_similarity"], r["random_logit_similarity"]) for v, r in rows.items()})
    for r in (clean, shortcut):
        assert r["trusted"] is True, r["trust_reason"]
        assert r["randomised_similarity"] <= 0.5 and r["random_logit_similarity"] <= 0.5
    # per layer, the shortcut model rests on the wall far more than the clean one somewhere in the net
    gap = max(dict(shortcut["layer_curve"])[n] - v for n, v in clean["layer_curve"])
    assert gap > 0.3 and "largest at" in p.stdout
    for r in rows.values():
        assert r["n_images"] >= 100 and Path(r["report"]).stat().st_size > 1000
        assert r["model"] in p.stdout and ("PASS" if r["passed"] else "FAIL") in p.stdout
    # detectors and segmenters through the same compiled pipeline
    for short in ("det", "seg"):
        for variant in ("clean", "shortcut"):
            for task in ("load-model", "shard-worker", "merge-results", "gate"):
                assert f"[demo] underpass-{short}-{variant}: Task '{task}' finished with status SUCCESS" in p.stderr
    # detectors: per ground-truth box the matched detection's map
    det_clean, det_short = detectors["clean"], detectors["shortcut"]
    print({v: (r["map50"], r["mean_invalid_activation_ratio"], r["per_class_invalid_ratio"]) for v, r in
           detectors.items()})
    assert det_clean["map50"] >= 0.8 and det_short["map50"] >= 0.8
    assert det_clean["passed"] and not det_short["passed"]
    # the shortcut detector's pedestrian boxes rest on the lamp (invalid pixels), the clean one's do not
    ped = "pedestrian"
    assert det_short["per_class_invalid_ratio"][ped] > det_clean["per_class_invalid_ratio"][ped] + 0.2
    for r in detectors.values():
        assert r["counts"]["rows"] >= 100 and r["counts"]["error"] == 0
        assert r["model"] in p.stdout and Path(r["report"]).stat().st_size > 1000
    # segmenters: per (image, object class) the map of the class's predicted region
    segmenters = {r["variant"]: r for r in every if r.get("task") == "segmentation"}
    seg_clean, seg_short = segmenters["clean"], segmenters["shortcut"]
    print({v: (r["object_miou"], r["mean_invalid_activation_ratio"], r["per_class_invalid_ratio"]) for v, r in
           segmenters.items()})
    assert seg_clean["object_miou"] >= 0.3 and seg_short["object_miou"] >= 0.3
    assert seg_clean["passed"] and not seg_short["passed"]
    # the shortcut segmenter's pedestrian region is explained by the lamp (invalid pixels), the clean one's not
    assert seg_short["per_class_invalid_ratio"][ped] > seg_clean["per_class_invalid_ratio"][ped] + 0.2
    for r in segmenters.values():
        assert r["counts"]["error"] == 0 and r["counts"]["ok"] >= 100 and r["counts"]["no_region"] > 0
        assert r["model"] in p.stdout and Path(r["report"]).stat().st_size > 1000


@pytest.mark.slow
def test_an_edge_map_of_the_demo_images_is_not_trusted(tmp_path, monkeypatch):
    """On the demo's clean model and test images: Grad-CAM passes the demo policy's faithfulness and
    sanity rules; a Sobel edge map of the image, offered as a method (it reads the input, through a
    layer that passes the image on), fails the sanity checks and the decision is not trusted."""
    from zoo import sobel_map

    from camgate.cam.methods import NATIVE
    from camgate.demo.main import POLICY
    from camgate.demo.train import train
    from camgate.gating.decision import gate
    from camgate.runner import run, run_road

    monkeypatch.setitem(NATIVE, "sobel", (sobel_map, False))
    card_path = train("clean", WORKDIR / "cache")  # cached by the demo
    card = yaml.safe_load(card_path.read_text())
    test_csv = str((card_path.parent / json.loads((card_path.parent / "metrics.json").read_text())["data"]).resolve())
    policy = {"rules": {k: POLICY["rules"][k] for k in ("faithfulness", "sanity")}}
    figures = {}
    for method, arch, layer in (("gradcam", card["arch"], card["target_layer"]),
                                ("sobel", "zoo:tapped_resnet18", "tap")):
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump({**card, "arch": arch, "target_layer": layer,
                                        "weights": str(card_path.parent / card["weights"])}))
        res, road = str(tmp_path / f"{method}.parquet"), str(tmp_path / f"{method}-road.parquet")
        run(str(path), test_csv, res, method=method, progress=False)
        run_road(str(path), test_csv, road, method=method, sample=16, sanity=True, progress=False)
        d = gate(res, policy, road=road)
        figures[method] = {k: round(d.overall[k], 3) for k in ("faithfulness_margin", "mean_randomised_spearman",
                                                               "mean_random_logit_spearman")}
        assert d.trusted is (method == "gradcam"), d.trust_reason
    print(figures)
    assert figures["sobel"]["faithfulness_margin"] > 0  # ROAD alone would trust the edge map (README)
    assert figures["sobel"]["mean_randomised_spearman"] == pytest.approx(1.0)
    assert figures["sobel"]["mean_random_logit_spearman"] == pytest.approx(1.0)
