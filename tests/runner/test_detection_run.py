"""`camgate run` on object detectors: one row per explained detection, ground-truth matching,
missed and no-detection rows, box metrics, D-RISE, and the refusals.

The detectors are tests/zoo.py's RegionDetector cards: two detections per image at known boxes
(input 48 x 64), classes 1 ('a') and 2 ('b'), each score reading one known region. Images are
taller than the input (they are stretched), so boxes must come back scaled to the image's pixels.
"""
import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import CAMGATE, HERE, png

from camgate.errors import ConfigError
from camgate.io import results as res
from camgate.runner import analyze
from camgate.runner.heatmaps import run

pytestmark = pytest.mark.usefixtures("one_thread")

REGIONS = [[0, 0, 32, 24], [40, 24, 64, 48]]  # input pixels (H 48, W 64)
HEIGHTS = [48, 72, 96, 60]  # image heights: boxes scale by h / 48


def card(folder, factory="region_detector", **extra):
    path = folder / f"{factory}.yaml"
    path.write_text(yaml.safe_dump({"name": factory, "task": "detection", "arch": f"zoo:{factory}",
                                    "num_classes": 3, "classes": ["background", "a", "b"],
                                    "input": {"size": [48, 64]}, "target_layer": "features", **extra}))
    return str(path)


def in_image(box, h):
    x1, y1, x2, y2 = box
    return [x1, y1 * h / 48, x2, y2 * h / 48]


def data_set(folder, boxes=None, invalid=0):
    """Images of texture; masks mark detection ``invalid``'s box invalid. ``boxes``: per image the
    manifest's boxes cell (None = no column)."""
    rng = np.random.default_rng(0)
    rows = []
    for i, h in enumerate(HEIGHTS):
        (folder / "images").mkdir(exist_ok=True)
        (folder / "masks").mkdir(exist_ok=True)
        (folder / "images" / f"{i}.png").write_bytes(png(rng.integers(0, 255, (h, 64, 3), dtype=np.uint8)))
        m = np.zeros((h, 64), np.uint8)
        x1, y1, x2, y2 = (round(v) for v in in_image(REGIONS[invalid], h))
        m[y1:y2, x1:x2] = 255
        (folder / "masks" / f"{i}.png").write_bytes(png(m))
        row = {"image": f"images/{i}.png", "mask": f"masks/{i}.png"}
        if boxes is not None:
            row["boxes"] = boxes[i] if isinstance(boxes[i], str) or boxes[i] is None else json.dumps(boxes[i])
        rows.append(row)
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(path):
    return pq.read_table(path).to_pylist()


def test_one_row_per_detection_with_boxes_in_image_pixels_and_box_metrics(tmp_path):
    out = tmp_path / "r.parquet"
    s = run(card(tmp_path), data_set(tmp_path), str(out), method="hirescam", score_threshold=0.0, progress=False)
    rows = rows_of(out)
    assert s.rows == len(rows) == 2 * len(HEIGHTS)
    assert [(r["row"], r["det_index"]) for r in rows] == [(i, k) for i in range(len(HEIGHTS)) for k in (0, 1)]
    for r in rows:
        k, h = r["det_index"], HEIGHTS[r["row"]]
        assert r["status"] == "ok" and r["det_class"] == r["predicted_class"] == r["target_class"] == k + 1
        assert r["det_label"] == r["predicted_label"] == "ab"[k]
        assert [r[c] for c in res.BOX_COLUMNS] == pytest.approx(in_image(REGIONS[k], h), abs=1e-3)
        assert 0 < r["det_score"] < 1 and r["gt_index"] is None and r["iou"] is None
        # detection 0's box is invalid: its map lies there, detection 1's map lies in its own valid box
        if k == 0:
            assert r["invalid_activation_ratio"] > 0.9 and r["box_invalid_area"] == pytest.approx(1, abs=0.02)
        else:
            assert r["invalid_activation_ratio"] < 0.1 and r["box_invalid_area"] == pytest.approx(0, abs=0.02)
        assert r["outside_box_ratio"] < 0.1  # each score reads its own box
    md = res.run_metadata(pq.read_schema(out))
    assert md["identity"]["task"] == "detection" and md["identity"]["score_threshold"] == 0.0
    assert md["identity"]["data"]["rows"] == len(HEIGHTS)  # images, not detections


def test_a_detection_resting_on_context_is_outside_its_box(tmp_path):
    out = tmp_path / "r.parquet"
    run(card(tmp_path, "context_detector"), data_set(tmp_path), str(out), method="hirescam", score_threshold=0.0,
        progress=False)
    rows = rows_of(out)
    print("outside_box_ratio", [round(r["outside_box_ratio"], 3) for r in rows])
    assert all(r["outside_box_ratio"] > 0.9 for r in rows)
    # detection 1 reads detection 0's (invalid) box: its heat is on invalid pixels
    assert all(r["invalid_activation_ratio"] > 0.9 for r in rows if r["det_index"] == 1)


def test_score_threshold_and_no_detection_rows(tmp_path):
    data = data_set(tmp_path)
    out = tmp_path / "all.parquet"
    run(card(tmp_path), data, str(out), score_threshold=0.0, progress=False)
    scores = sorted(r["det_score"] for r in rows_of(out))
    cut = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    run(card(tmp_path), data, str(tmp_path / "half.parquet"), score_threshold=cut, progress=False)
    half = rows_of(tmp_path / "half.parquet")
    kept = [r for r in half if r["status"] == "ok"]
    assert len(kept) == len(scores) // 2 and all(r["det_score"] >= cut for r in kept)
    # an image whose detections all fall below keeps one row
    assert {r["row"] for r in half} == set(range(len(HEIGHTS)))
    run(card(tmp_path), data, str(tmp_path / "none.parquet"), score_threshold=1.0, progress=False)
    none = rows_of(tmp_path / "none.parquet")
    assert [(r["row"], r["status"], r["det_index"], r["cam"]) for r in none] == \
        [(i, "no_detection", None, None) for i in range(len(HEIGHTS))]


def test_ground_truth_is_matched_missed_boxes_are_rows_and_bad_boxes_are_row_errors(tmp_path):
    h0, h1, h2, h3 = HEIGHTS
    boxes = [
        [{"box": in_image(REGIONS[1], h0), "label": "b"}, {"box": [0, 30, 20, 46], "label": "a"}],  # 1 hit, 1 miss
        [{"box": in_image(REGIONS[0], h1), "label": 2}],  # right place, wrong class: missed
        "[{\"box\": [1, 2, 3]",  # malformed JSON
        [{"box": in_image(REGIONS[0], h3), "label": "zebra"}],  # a class the model does not have
    ]
    out = tmp_path / "r.parquet"
    run(card(tmp_path), data_set(tmp_path, boxes), str(out), score_threshold=0.0, progress=False)
    rows = rows_of(out)
    got = [(r["row"], r["status"], r["gt_index"], r["det_index"]) for r in rows]
    assert got == [(0, "ok", 0, 1), (0, "missed", 1, None), (1, "missed", 0, None), (2, "error", None, None),
                   (3, "error", None, None)]
    hit, missed = rows[0], rows[1]
    assert hit["iou"] == pytest.approx(1, abs=1e-3) and hit["label"] == "b" and hit["cam"]
    assert missed["cam"] is None and [missed[c] for c in res.BOX_COLUMNS] == [0, 30, 20, 46]
    assert missed["label"] == "a" and missed["target_class"] == 1
    assert "not valid JSON" in rows[3]["error"] and "images/2.png" in rows[3]["error"]
    assert "zebra" in rows[4]["error"] and rows[4]["error_kind"] == "input"


def test_coco_annotations_give_the_ground_truth(tmp_path):
    data = data_set(tmp_path)
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": h} for i, h in enumerate(HEIGHTS[:2])],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [0, 0, 32, 24], "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "r.parquet"
    run(card(tmp_path), data, str(out), score_threshold=0.0, annotations=str(tmp_path / "coco.json"), progress=False)
    rows = rows_of(out)
    got = [(r["row"], r["status"], r["gt_index"], r["det_index"]) for r in rows]
    # image 1 is annotated with no object: nothing to explain; images 2 and 3 are not in the file: no
    # ground truth given, so every detection is explained
    assert got == [(0, "ok", 0, 0), (1, "no_detection", None, None)] + [(i, "ok", None, k) for i in (2, 3)
                                                                       for k in (0, 1)]


def test_heatmaps_then_analyze_equals_one_run(tmp_path):
    data, c = data_set(tmp_path), card(tmp_path)
    run(c, data, str(tmp_path / "one.parquet"), method="hirescam", score_threshold=0.0, progress=False)
    run(c, data, str(tmp_path / "maps.parquet"), method="hirescam", score_threshold=0.0, analyze=False,
        progress=False)
    analyze(str(tmp_path / "maps.parquet"), str(tmp_path / "two.parquet"), progress=False)
    one, two = rows_of(tmp_path / "one.parquet"), rows_of(tmp_path / "two.parquet")
    cols = ("row", "det_index", "status", "invalid_activation_ratio", "outside_box_ratio", "box_invalid_area",
            "topk_invalid_share", *res.BOX_COLUMNS)
    assert [[r[c] for c in cols] for r in one] == [[r[c] for c in cols] for r in two]


def test_drise_on_a_torch_detector(tmp_path):
    out = tmp_path / "r.parquet"
    run(card(tmp_path), data_set(tmp_path), str(out), method="drise", budget=96, seed=3, score_threshold=0.0,
        progress=False)
    rows = rows_of(out)
    assert len(rows) == 2 * len(HEIGHTS) and all(r["method"] == "drise" for r in rows)
    assert all((r["cam_height"], r["cam_width"]) == (48, 64) for r in rows)  # input resolution
    r0 = np.mean([r["invalid_activation_ratio"] for r in rows if r["det_index"] == 0])
    r1 = np.mean([r["invalid_activation_ratio"] for r in rows if r["det_index"] == 1])
    print("D-RISE invalid ratio, detection on the invalid box vs the valid one:", round(r0, 3), round(r1, 3))
    assert r0 > r1


def test_refusals_before_any_data(tmp_path):
    data, c = data_set(tmp_path), card(tmp_path)
    with pytest.raises(ConfigError, match="does not apply to a detector"):
        run(c, data, str(tmp_path / "x.parquet"), target="1", progress=False)
    with pytest.raises(ConfigError, match="score_threshold"):
        run(c, data, str(tmp_path / "x.parquet"), score_threshold=1.5, progress=False)
    from camgate.runner.layers import run_layers
    from camgate.runner.road import run_road

    for fn in (run_layers, run_road):
        with pytest.raises(ConfigError, match="is a detector"):
            fn(c, data, str(tmp_path / "x.parquet"))
    with pytest.raises(ConfigError, match="wrong structure"):
        run(card(tmp_path, "broken_detector"), data, str(tmp_path / "x.parquet"), progress=False)
    with pytest.raises(ConfigError, match="drise explains object detectors"):
        from helpers import tiny_card

        run(str(tiny_card(tmp_path)), data, str(tmp_path / "x.parquet"), method="drise", progress=False)
    assert not list(tmp_path.glob("x.parquet*"))


def test_cli_exit_codes(tmp_path):
    data = data_set(tmp_path)
    env = {"PYTHONPATH": HERE, "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([*CAMGATE, "run", "--model", card(tmp_path), "--data", data,
                         "--out", str(tmp_path / "r.parquet"), "--score-threshold", "0", "--quiet"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rows"] == 2 * len(HEIGHTS)
    bad = subprocess.run([*CAMGATE, "run", "--model", card(tmp_path, "broken_detector"),
                          "--data", data, "--out", str(tmp_path / "b.parquet")], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "wrong structure" in bad.stderr


# --- files: resume, merge, gate -------------------------------------------------------------------

def test_committed_parts_resume_by_image_and_a_retried_image_may_grow(tmp_path):
    """An image's rows are committed together and parts count images: a resumed run skips whole images,
    and an image retried after a storage error may come back with more rows than its one error row."""
    schema = res.schema(None, {}, res.task_fields("detection"))
    out, parts = str(tmp_path / "r.parquet"), str(tmp_path / "parts")

    def image(r, n, status="ok", kind=None):
        return [{"row": r, "image": f"{r}.png", "det_index": k, "status": status, "error_kind": kind}
                for k in range(n)]

    first = [image(0, 2), image(1, 1, "error", "storage"), image(2, 3), image(3, 1, "no_detection")]
    with pytest.raises(RuntimeError):
        with res.ResultsWriter(out, schema, 2, "fp", parts) as w:
            for rows in first:
                w.write(rows)  # 2 rows per part at least: images are never split
            raise RuntimeError("killed")
    w = res.ResultsWriter(out, schema, 2, "fp", parts)
    with w:
        # image 3 was still in the buffer when the run died: three images were committed, in two parts
        assert w.resumed == 3 and w.retry == [1] and len(w.resumed_status) == 6
        w.replace([1], [image(1, 3)])
        assert len(w.resumed_status) == 8
        w.write(image(3, 1, "no_detection"))
        w.write(image(4, 2))
    t = pq.read_table(out)
    assert list(zip(t.column("row").to_pylist(), t.column("det_index").to_pylist())) == \
        [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (4, 0), (4, 1)]


def test_shards_of_a_detection_run_merge_into_the_one_run(tmp_path):
    from camgate.runner.shards import merge, plan, run_shard

    data, c = data_set(tmp_path, [[{"box": in_image(REGIONS[0], h), "label": "a"}] if i % 2 else None
                                  for i, h in enumerate(HEIGHTS)]), card(tmp_path)
    run(c, data, str(tmp_path / "one.parquet"), score_threshold=0.0, progress=False)
    shards = plan(data, 3, str(tmp_path / "shards"))
    parts = [run_shard(c, s, score_threshold=0.0)["part"] for s in shards]
    merge(parts, str(tmp_path / "merged.parquet"), data=data)
    one, merged = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "merged.parquet")
    cols = [c for c in one.column_names if c not in ("image", "mask")]  # shard manifests resolve URIs alike
    assert one.select(cols).to_pylist() == merged.select(cols).to_pylist()
    ident = lambda t: res.run_metadata(t)["identity"]  # noqa: E731
    assert ident(one)["data"] == ident(merged)["data"]


def test_the_gate_judges_detections_per_class(tmp_path):
    from camgate.gating.decision import gate

    out = tmp_path / "r.parquet"
    run(card(tmp_path), data_set(tmp_path), str(out), method="hirescam", score_threshold=0.0, progress=False)
    d = gate(str(out), {"name": "det", "per_class": True,
                        "rules": {"mean_invalid_activation_ratio": {"max": 0.5}}})
    verdicts = {(r.rule, r.scope): r.verdict for r in d.rules}
    # class 'a' (detection 0) rests on invalid pixels, class 'b' does not; the whole run's mean passes
    assert not d.passed and verdicts[("mean_invalid_activation_ratio", "class=a")] == "fail"
    assert verdicts[("mean_invalid_activation_ratio", "class=b")] == "pass"
    assert verdicts[("mean_invalid_activation_ratio", "all")] == "pass"
    assert d.counts == {"rows": 8, "ok": 8, "no_activation": 0, "error": 0, "no_detection": 0, "missed": 0}


def test_a_black_box_detector_card_runs_drise_and_refuses_gradients(tmp_path):
    path = tmp_path / "bb.yaml"
    path.write_text(yaml.safe_dump({"name": "bb", "task": "detection", "kind": "callable",
                                    "arch": "zoo:region_callable",
                                    "num_classes": 3, "classes": ["background", "a", "b"],
                                    "input": {"size": [48, 64]}}))
    data = data_set(tmp_path)
    with pytest.raises(ConfigError, match="use method drise"):
        run(str(path), data, str(tmp_path / "x.parquet"), progress=False)
    run(str(path), data, str(tmp_path / "bb.parquet"), method="drise", budget=32, score_threshold=0.0,
        progress=False)
    run(card(tmp_path), data, str(tmp_path / "torch.parquet"), method="drise", budget=32, score_threshold=0.0,
        progress=False)
    cols = ("row", "det_index", "det_score", "cam", "invalid_activation_ratio")
    a, b = pq.read_table(tmp_path / "bb.parquet"), pq.read_table(tmp_path / "torch.parquet")
    assert a.select(cols).to_pylist() == b.select(cols).to_pylist()  # the same model, seeded alike


def test_torchvision_detectors_load_at_the_cards_size_and_fpn_layers_need_reshape(tmp_path):
    from camgate.errors import ModelCardError
    from camgate.model import load_model

    def det_card(**kw):
        d = {"name": "tv", "task": "detection", "arch": "torchvision/fasterrcnn_mobilenet_v3_large_320_fpn",
             "num_classes": 3, "input": {"size": [128, 160]}, **kw}
        (tmp_path / "tv.yaml").write_text(yaml.safe_dump(d))
        return str(tmp_path / "tv.yaml")

    lm = load_model(det_card(), device="cpu")
    assert lm.target_layers == ["backbone.body.16"]  # the backbone's last block
    assert lm.model.transform.min_size == (128,) and lm.model.transform.max_size == 160
    assert lm.card.input.mean == (0.0, 0.0, 0.0) and lm.card.input.std == (1.0, 1.0, 1.0)
    with pytest.raises(ModelCardError, match="reshape: fpn"):
        load_model(det_card(target_layer="backbone"), device="cpu")
    assert load_model(det_card(target_layer="backbone", reshape="fpn"), device="cpu").reshape_transform
    with pytest.raises(ModelCardError, match="task: detection"):
        load_model(det_card(task="classification"), device="cpu")
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump({"name": "c", "task": "detection", "arch": "torchvision/resnet18",
                                                       "num_classes": 3}))
    with pytest.raises(ModelCardError, match="task: classification"):
        load_model(str(tmp_path / "cls.yaml"), device="cpu")


def test_the_python_api_refuses_a_detector(tmp_path):
    import camgate

    with pytest.raises(ConfigError, match="is a detector"):
        camgate.explain(card(tmp_path), [np.zeros((48, 64, 3), np.uint8)])
