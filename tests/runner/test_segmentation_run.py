"""`camgate run` on semantic segmentation and multi-label models: one row per (image, explained class),
region metrics, named classes, no_region / no_label rows, run == heatmaps-only + analyze, resume,
per-class gate scopes, black-box RISE and the refusals.

Segmentation: tests/zoo.py's RegionSegmenter (input 48 x 64): class 1 predicted on [0, 0, 32, 24],
class 2 on [40, 24, 64, 48] (xyxy), class 0 (background) elsewhere; each class's scores read its own
region only. Masks mark class 1's region invalid.
"""
import json
import math
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import CAMGATE, HERE, png

from camgate.errors import ConfigError, ModelCardError
from camgate.runner import analyze
from camgate.runner.heatmaps import run

pytestmark = pytest.mark.usefixtures("one_thread")

REGIONS = [[0, 0, 32, 24], [40, 24, 64, 48]]  # classes 1, 2 in input pixels (H 48, W 64)
N = 3


def card(folder, factory="region_segmenter", task="segmentation", **extra):
    path = folder / f"{factory}-{task}.yaml"
    path.write_text(yaml.safe_dump({"name": factory, "task": task, "arch": f"zoo:{factory}", "num_classes": 3,
                                    "classes": ["background", "a", "b"], "input": {"size": [48, 64]},
                                    "target_layer": "gate", **extra}))
    return str(path)


def data_set(folder, n=N, invalid=0):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        (folder / "images" / f"{i}.png").write_bytes(png(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
        m = np.zeros((48, 64), np.uint8)
        x1, y1, x2, y2 = REGIONS[invalid]
        m[y1:y2, x1:x2] = 255
        (folder / "masks" / f"{i}.png").write_bytes(png(m))
        rows.append({"image": f"images/{i}.png", "mask": f"masks/{i}.png"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or \
        a == pytest.approx(b, abs=1e-9)


def rows_of(path):
    return pq.read_table(path).to_pylist()


def test_one_row_per_predicted_class_with_region_metrics(tmp_path):
    out = tmp_path / "r.parquet"
    s = run(card(tmp_path), data_set(tmp_path), str(out), progress=False)
    rows = rows_of(out)
    # background's scores are a constant 0: no gradient, a no_activation row
    assert s.rows == len(rows) == 3 * N and s.counts["ok"] == 2 * N and s.counts["no_activation"] == N
    assert [(r["row"], r["target_class"]) for r in rows] == [(i, c) for i in range(N) for c in (0, 1, 2)]
    area = {0: 48 * 64 - 32 * 24 - 24 * 24, 1: 32 * 24, 2: 24 * 24}
    by = {}
    for r in rows:
        c = r["target_class"]
        assert r["status"] == ("no_activation" if c == 0 else "ok") and r["predicted_class"] == c
        assert r["predicted_label"] == ["background", "a", "b"][c]
        assert r["region_pixels"] == area[c] and (r["region_height"], r["region_width"]) == (48, 64)
        assert 0 < r["predicted_score"] <= 1
        by.setdefault(c, []).append(r)
    for r in by[1]:  # class 1's region is masked invalid: its map lies there, inside its region
        assert r["invalid_activation_ratio"] > 0.9
        assert r["outside_region_ratio"] < 0.1 and r["region_invalid_area"] == pytest.approx(1.0)
    for r in by[2]:  # class 2 reads its own valid region
        assert r["invalid_activation_ratio"] < 0.1 and r["outside_region_ratio"] < 0.1
        assert r["region_invalid_area"] == pytest.approx(0.0)
    md = json.loads(pq.read_schema(out).metadata[b"camgate"])
    assert md["identity"]["task"] == "segmentation" and md["classes"] is None


def test_named_classes_and_an_empty_region_row(tmp_path):
    out = tmp_path / "r.parquet"
    c = card(tmp_path, num_classes=4, classes=["background", "a", "b", "never"])
    s = run(c, data_set(tmp_path), str(out), classes="a,3", progress=False)
    rows = rows_of(out)
    assert [(r["row"], r["target_class"], r["status"]) for r in rows] == \
        [(i, k, st) for i in range(N) for k, st in ((1, "ok"), (3, "no_region"))]
    assert s.counts["no_region"] == N
    empty = rows[1]
    assert empty["cam"] is None and empty["invalid_activation_ratio"] is None and empty["region_pixels"] == 0
    assert "images/0.png" in empty["error"] and "class 3" in empty["error"]


def test_refusals_before_reading_data(tmp_path):
    with pytest.raises(ConfigError, match="class 7 is outside the model's 3 classes"):
        run(card(tmp_path), str(tmp_path / "missing.jsonl"), str(tmp_path / "o.parquet"), classes="7")
    with pytest.raises(ConfigError, match="'zebra' is neither"):
        run(card(tmp_path), str(tmp_path / "missing.jsonl"), str(tmp_path / "o.parquet"), classes="zebra")
    with pytest.raises(ModelCardError, match="segmentation model must output"):
        run(card(tmp_path, "flat_segmenter", target_layer="features.2"), str(tmp_path / "missing.jsonl"),
            str(tmp_path / "o.parquet"))


def test_cli_exit_2_for_a_class_outside_the_model_and_a_wrong_rank_output(tmp_path):
    data = data_set(tmp_path, n=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    p = subprocess.run([*CAMGATE, "run", "--model", card(tmp_path), "--data", str(tmp_path / "nothing.jsonl"),
                        "--out", str(tmp_path / "o.parquet"), "--classes", "5"], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 2 and "class 5 is outside" in p.stderr
    p = subprocess.run([*CAMGATE, "run", "--model", card(tmp_path, "flat_segmenter", target_layer="features.2"),
                        "--data", data, "--out", str(tmp_path / "o.parquet")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "(B, K, H, W)" in p.stderr


def test_run_equals_heatmaps_only_then_analyze(tmp_path):
    c, data = card(tmp_path), data_set(tmp_path)
    run(c, data, str(tmp_path / "r.parquet"), progress=False)
    run(c, data, str(tmp_path / "h.parquet"), analyze=False, progress=False)
    analyze(str(tmp_path / "h.parquet"), str(tmp_path / "a.parquet"), data=data, progress=False)
    a, b = rows_of(tmp_path / "r.parquet"), rows_of(tmp_path / "a.parquet")
    assert len(a) == len(b) == 3 * N
    for x, y in zip(a, b):
        for k in ("row", "target_class", "status", "invalid_activation_ratio", "outside_region_ratio",
                  "region_invalid_area", "region_pixels", "auc"):
            assert same(x[k], y[k]), k


def test_resume_skips_committed_images(tmp_path, monkeypatch):
    from camgate.runner.segmentation import SegmentationRunner

    c, data = card(tmp_path), data_set(tmp_path, n=4)
    out, parts = tmp_path / "r.parquet", tmp_path / "parts"
    orig = SegmentationRunner.process
    seen = []

    def crash_after_two(self, batch):
        seen.extend(s.item.index for s in batch)
        if len(seen) > 2:
            raise KeyboardInterrupt
        return orig(self, batch)

    monkeypatch.setattr(SegmentationRunner, "process", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(c, data, str(out), batch_size=1, checkpoint_rows=1, checkpoint=str(parts), progress=False)
    monkeypatch.setattr(SegmentationRunner, "process", lambda self, b: seen.extend(s.item.index for s in b) or
                        orig(self, b))
    seen.clear()
    s = run(c, data, str(out), batch_size=1, checkpoint_rows=1, checkpoint=str(parts), progress=False)
    assert seen == [2, 3] and s.resumed == 6 and s.computed == 6
    run(c, data, str(tmp_path / "full.parquet"), progress=False)
    a, b = rows_of(out), rows_of(tmp_path / "full.parquet")
    assert [(r["row"], r["target_class"], r["status"]) for r in a] == [(r["row"], r["target_class"], r["status"])
                                                                        for r in b]
    assert all(same(x["invalid_activation_ratio"], y["invalid_activation_ratio"]) for x, y in zip(a, b))


def test_gate_per_class_scopes_and_report(tmp_path):
    out = tmp_path / "r.parquet"
    c = card(tmp_path, num_classes=4, classes=["background", "a", "b", "never"])
    run(c, data_set(tmp_path), str(out), classes="a,b,3", progress=False)
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump({"name": "p", "per_class": "predicted", "rules": {
        "no_activation_rate": None, "mean_invalid_activation_ratio": {"max": 0.5}}}))
    p = subprocess.run([*CAMGATE, "gate", str(out), "--policy", str(pol), "--report", str(tmp_path / "g.html"),
                        "--record", str(tmp_path / "rec.json"), "--junit", str(tmp_path / "j.xml")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert not d["passed"] and d["counts"]["no_region"] == N and "no_label" not in d["counts"]
    verdicts = {r["scope"]: r["verdict"] for r in d["rules"] if r["rule"] == "mean_invalid_activation_ratio"}
    # class a's region is the invalid one; b reads its valid region; 'never' has no region anywhere
    assert verdicts == {"all": "pass", "class=a": "fail", "class=b": "pass", "class=never": "skip"}
    assert {s["scope"]: s["no_region"] for s in d["scopes"]} == {"class=a": 0, "class=b": 0, "class=never": N}
    # one picture per (image, class) in the gallery: rows of one image are told apart by their class
    page = (tmp_path / "g.html").read_text()
    assert page.count('<img class="overlay"') == 2 * N and "(picture not available" not in page
    from camgate.report.overlays import overlays

    pics = overlays(str(out))
    assert set(pics) == {(i, "class", c) for i in range(N) for c in (1, 2)}
    # the class's region is outlined in cyan: present in the picture of each class, in no other colour map
    import io

    import numpy as np
    from PIL import Image

    for key, pic in pics.items():
        rgb = np.asarray(Image.open(io.BytesIO(pic)).convert("RGB")).astype(int)
        cyan = (rgb[..., 0] < 40) & (rgb[..., 1] > 215) & (rgb[..., 2] > 215)
        assert cyan.sum() > 10, key
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["task"] == "segmentation"
    seg = rec["segmentation"]
    assert seg["images"] == N and seg["rows"] == 3 * N and seg["no_region"] == N
    assert seg["explained"] == 2 * N and seg["classes"] == {"a": N, "b": N}
    assert rec["data"]["counts"]["no_region"] == N
    junit = (tmp_path / "j.xml").read_text()
    assert '<property name="task" value="segmentation"' in junit and f"{2 * N} classes explained" in junit
    assert "A segmentation run: one row per (image, class explained)" in page
    assert "mean outside-region ratio" in page


def ml_card(folder, **extra):
    return card(folder, "tiny_cnn", task="multilabel", target_layer="features.2", input={"size": [32, 32]}, **extra)


def test_multilabel_rows_per_positive_label_at_the_threshold(tmp_path):
    from zoo import tiny_cnn

    data = data_set(tmp_path)
    out = tmp_path / "m.parquet"
    torch.manual_seed(0)
    s = run(ml_card(tmp_path), data, str(out), score_threshold=0.5, progress=False)
    rows = rows_of(out)
    assert s.rows == len(rows)
    for r in rows:
        assert r["status"] in ("ok", "no_activation", "no_label")
        if r["status"] != "no_label":
            assert r["predicted_score"] >= 0.5 and r["target_class"] == r["predicted_class"]
    # a threshold no label reaches: one no_label row per image, naming it
    s = run(ml_card(tmp_path), data, str(tmp_path / "none.parquet"), score_threshold=0.999999, progress=False)
    rows = rows_of(tmp_path / "none.parquet")
    assert s.counts["no_label"] == N == len(rows)
    assert all("no label scores" in r["error"] and r["image"] in r["error"] for r in rows)
    # named labels: one row each, whatever their score
    run(ml_card(tmp_path), data, str(tmp_path / "named.parquet"), classes="0,2", progress=False)
    assert [(r["row"], r["target_class"]) for r in rows_of(tmp_path / "named.parquet")] == \
        [(i, c) for i in range(N) for c in (0, 2)]
    del tiny_cnn


def test_blackbox_rise_through_a_callable_card_with_an_exact_budget(tmp_path, monkeypatch):
    from camgate.model.backends import CallableBackend

    calls = []
    orig = CallableBackend._scores

    def counted(self, x):
        calls.append(x.shape[0])
        return orig(self, x)

    monkeypatch.setattr(CallableBackend, "_scores", counted)
    path = tmp_path / "cb.yaml"
    path.write_text(yaml.safe_dump({"name": "cb", "task": "segmentation", "kind": "callable",
                                    "arch": "zoo:segmenter_scores", "num_classes": 4,
                                    "input": {"size": [48, 64]}}))
    data = data_set(tmp_path, n=2)
    out = tmp_path / "b.parquet"
    calls.clear()
    run(str(path), data, str(out), method="rise", budget=16, seed=3, batch_size=2, progress=False)
    rows = rows_of(out)
    # the card's dry call at load, then one clean pass per image and budget masked passes per image
    assert calls[0] == 1 and sum(calls[1:]) == 2 + 2 * 16
    assert [(r["row"], r["target_class"]) for r in rows] == [(i, c) for i in range(2) for c in (0, 1, 2)]
    assert all(r["status"] in ("ok", "no_activation") and r["method"] == "rise" for r in rows)
    # seeded per image from seed and row: the same maps in another batch size
    run(str(path), data, str(tmp_path / "b1.parquet"), method="rise", budget=16, seed=3, batch_size=1,
        progress=False)
    assert [r["cam"] for r in rows] == [r["cam"] for r in rows_of(tmp_path / "b1.parquet")]
    with pytest.raises(Exception, match="decam or rise"):
        run(str(path), data, str(tmp_path / "g.parquet"), method="gradcam", progress=False)


def test_multilabel_heatmaps_then_analyze_and_rise_on_a_torch_card(tmp_path):
    c, data = ml_card(tmp_path), data_set(tmp_path)
    run(c, data, str(tmp_path / "r.parquet"), classes="0,1", progress=False)
    run(c, data, str(tmp_path / "h.parquet"), classes="0,1", analyze=False, progress=False)
    analyze(str(tmp_path / "h.parquet"), str(tmp_path / "a.parquet"), data=data, progress=False)
    a, b = rows_of(tmp_path / "r.parquet"), rows_of(tmp_path / "a.parquet")
    assert [(r["row"], r["target_class"]) for r in a] == [(i, c) for i in range(N) for c in (0, 1)]
    assert all(same(x[k], y[k]) for x, y in zip(a, b) for k in ("invalid_activation_ratio", "auc", "status"))
    s = run(c, data, str(tmp_path / "rise.parquet"), method="rise", budget=8, classes="2", progress=False)
    rows = rows_of(tmp_path / "rise.parquet")
    assert s.rows == N and all(r["method"] == "rise" and r["target_class"] == 2 for r in rows)
