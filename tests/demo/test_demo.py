"""The README's main job, end to end: both models accurate, the shortcut model fails the gate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    rows = {r["variant"]: r for r in every if r.get("task") != "detection"}
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
    # per layer, the shortcut model rests on the wall far more than the clean one somewhere in the net
    gap = max(dict(shortcut["layer_curve"])[n] - v for n, v in clean["layer_curve"])
    assert gap > 0.3 and "largest at" in p.stdout
    for r in rows.values():
        assert r["n_images"] >= 100 and Path(r["report"]).stat().st_size > 1000
        assert r["model"] in p.stdout and ("PASS" if r["passed"] else "FAIL") in p.stdout
    # detectors: per ground-truth box the matched detection's map, through the same compiled pipeline
    for variant in ("clean", "shortcut"):
        for task in ("load-model", "shard-worker", "merge-results", "gate"):
            assert f"[demo] underpass-det-{variant}: Task '{task}' finished with status SUCCESS" in p.stderr
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
