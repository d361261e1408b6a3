"""A detection run's report: one results row per (image, explained detection), `no_detection` and
`missed` rows beside the others; boxes drawn on the overlays, per-detection tables, the record's
counts of images and detections, and JUnit names that stay unique. Classification reports unchanged."""
import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import chromium, png
from PIL import Image

from camgate import report
from camgate.data.geometry import InputSpec
from camgate.io import results as res
from camgate.report import detection
from camgate.report.overlays import box_in_view

# the model sees a centre crop: boxes (original pixels) must be moved and scaled onto it
INPUT = {"size": [32, 32], "resize": "center_crop", "resize_to": 36}
W, H = 80, 60
POLICY = {"name": "det", "per_class": True,
          "rules": {"mean_invalid_activation_ratio": {"max": 0.5}, "no_activation_rate": None, "error_rate": None}}


def _cam(peak) -> bytes:
    cam = np.zeros((7, 7), np.float32)
    cam[peak] = 1.0
    cam[3, 3] = 0.3
    return res.cam_bytes(cam)


# (row, det_index, status, class, label, score, box, gt, iou, ratio, outside box, box invalid area)
DETS = [
    (0, 0, "ok", 2, "car", 0.9, (20, 10, 60, 50), 0, 0.8, 0.7, 0.4, 0.2),
    (0, 1, "ok", 1, "person", 0.6, (16, 6, 36, 30), 1, 0.5, 0.2, 0.6, 0.5),
    (1, 0, "ok", 2, "car", 0.95, (30, 20, 64, 52), 0, 0.9, 0.4, 0.1, 0.0),
    (1, 1, "ok", 2, "car", 0.5, (14, 4, 40, 26), None, None, 0.1, 0.3, 0.1),
    (1, 2, "no_activation", 1, "person", 0.3, (50, 30, 70, 58), None, None, None, None, 0.0),
    (1, None, "missed", 1, "person", None, (2, 2, 12, 20), 1, None, None, None, None),
    (2, None, "no_detection", None, None, None, None, None, None, None, None, None),
    (3, 0, "ok", 3, "dog", 0.8, (24, 12, 58, 48), None, None, 0.9, 0.05, 0.3),
    (3, 1, "error", 1, "person", 0.4, (40, 30, 70, 55), None, None, None, None, None),
]


def det_rows(folder) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for row in range(4):
        img, mask = folder / f"img{row}.png", folder / f"mask{row}.png"
        img.write_bytes(png(rng.integers(60, 190, (H, W, 3), dtype=np.uint8)))
        m = np.zeros((H, W), np.uint8)
        m[:15] = 255  # the top quarter is invalid
        mask.write_bytes(png(m))
    for k, (row, det, status, cls, label, score, box, gt, iou, ratio, outside, box_area) in enumerate(DETS):
        mapped = status in ("ok", "no_activation")
        rows.append({
            "row": row, "image_id": f"img{row}", "image": str(folder / f"img{row}.png"),
            "mask": str(folder / f"mask{row}.png"), "status": status, "label": None,
            "error": "model: NaN in the map" if status == "error" else None,
            "error_kind": "model" if status == "error" else None,
            "predicted_class": cls, "predicted_label": label, "predicted_score": score, "target_class": cls,
            "method": "gradcam", "target_layer": "backbone", "invalid_activation_ratio": ratio,
            "invalid_area_ratio": 0.25 if mapped else None, "peak_in_invalid": (ratio or 0) > 0.5 if mapped else None,
            "topk_invalid_share": ratio, "cam_height": 7 if mapped else None, "cam_width": 7 if mapped else None,
            "cam": _cam((k % 7, (3 * k) % 7)) if status == "ok" else
            (res.cam_bytes(np.zeros((7, 7), np.float32)) if mapped else None),
            "image_width": W, "image_height": H,
            "det_index": det, "det_class": cls, "det_label": label, "det_score": score,
            **dict(zip(detection.BOX, box or (None,) * 4)), "gt_index": gt, "iou": iou,
            "outside_box_ratio": outside, "box_invalid_area": box_area})
    return rows


def metadata(task="detection") -> dict:
    return {"identity": {"task": task, "method": "gradcam"}, "method": "gradcam", "target": "predicted",
            "target_layer": ["backbone"], "stage": "results",
            "model": {"name": "det", "arch": "zoo:det", "task": task, "input": INPUT,
                      "classes": ["bg", "person", "car", "dog"]}}


def write(path, rows, fields) -> str:
    with res.ResultsWriter(str(path), res.schema(None, metadata(), fields=fields)) as w:
        w.write(rows)
    return str(path)


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    rows = det_rows(tmp)
    path = write(tmp / "results.parquet", rows, res.FIELDS + res.DETECTION_FIELDS)
    # the same rows without the box columns: the overlays the boxes are drawn over
    plain = [{k: v for k, v in r.items() if k not in detection.BOX} for r in rows]
    fields = res.FIELDS + [f for f in res.DETECTION_FIELDS if f[0] not in res.BOX_COLUMNS]
    bare = write(tmp / "no_boxes.parquet", plain, fields)
    return {"tmp": tmp, "results": path, "no_boxes": bare}


def _rgb(pic: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(pic)).convert("RGB")).astype(int)


def test_a_box_in_original_pixels_lands_on_the_model_view():
    spec = InputSpec.from_card(INPUT)
    crop = spec.box(W, H)
    assert crop != (0, 0, W, H)  # a real crop: offsets and scale matter
    size = (160, 160)
    assert box_in_view(crop, crop, size) == (0, 0, 159, 159)  # the crop itself fills the panel
    left, top, right, bottom = crop
    half = (left + (right - left) / 2, top + (bottom - top) / 2, right, bottom)
    assert box_in_view(half, crop, size) == (80, 80, 159, 159)
    x1, y1, x2, y2 = box_in_view((0, 0, left, top), crop, size)  # above and left of the crop: off the panel
    assert x2 < 0 and y2 < 0


def test_overlays_draw_each_detections_box(det_run):
    pics, bare = report.overlays(det_run["results"]), report.overlays(det_run["no_boxes"])
    ok = [(r[0], r[1]) for r in DETS if r[2] == "ok"]
    assert set(pics) == set(bare) == set(ok)  # one picture per detection, keyed by (row, det_index)
    spec = InputSpec.from_card(INPUT)
    crop = spec.box(W, H)
    for row, det, _, _, _, _, box, *_ in (r for r in DETS if r[2] == "ok"):
        a, b = _rgb(pics[row, det]), _rgb(bare[row, det])
        assert a.shape == b.shape == (160, 2 * 160 + 4, 3)
        x1, y1, x2, y2 = box_in_view(box, crop, (160, 160))
        assert 0 <= x1 < x2 < 159 and 0 <= y1 < y2 < 159  # inside the panels: every side is drawn
        for off in (0, 164):  # both panels: the model's view and the heatmap
            # the bottom edge (2 px, white) with the line just outside it (black); both are new
            for y, bright in ((y2, True), (y2 - 1, True), (y2 + 1, False)):
                line = a[y, off + x1:off + x2 + 1]
                assert ((line >= 235) if bright else (line <= 20)).all(), (row, det, off, y)
            assert np.abs(a[y2, off + x1:off + x2 + 1] - b[y2, off + x1:off + x2 + 1]).max() > 60
        # the right panel's sides too; the caption sits on the first panel only
        assert (a[y1:y2 + 1, 164 + x1] >= 235).all() and (a[y1:y2 + 1, 164 + x2] >= 235).all()
        assert (a[y1, 164 + x1:164 + x2 + 1] >= 235).all()
        left, right = np.abs(a - b)[:, :160].max(axis=2) > 60, np.abs(a - b)[:, 164:].max(axis=2) > 60
        assert left.sum() > right.sum()
        # the heatmap inside the box is left as it was
        inner = (slice(y1 + 3, y2 - 2), slice(164 + x1 + 3, 164 + x2 - 2))
        assert np.abs(a[inner] - b[inner]).mean() < 2  # up to the 256-colour palette
    # two detections of one image: two pictures, each with its own box
    assert not np.array_equal(_rgb(pics[0, 0]), _rgb(pics[0, 1]))


def test_the_report_of_a_detection_run_renders_in_a_browser(det_run, tmp_path):
    from html.parser import HTMLParser

    decision, files = report.artifacts(det_run["results"], POLICY)
    page = tmp_path / "report.html"
    page.write_bytes(files["report.html"])
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                   page.as_uri())

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.headings, self.tables, self.imgs, self._in, self._cell = [], [], 0, None, None

        def handle_starttag(self, tag, attrs):
            self._in = tag if tag in ("h1", "h2", "h3") else None
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self._cell = ""
            elif tag == "img" and dict(attrs).get("class") == "overlay":
                self.imgs += 1

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self._cell is not None:
                self.tables[-1][-1].append(self._cell.strip())
                self._cell = None

        def handle_data(self, data):
            if self._cell is not None:
                self._cell += data
            if self._in:
                self.headings.append(data.strip())
                self._in = None

    p = Parse()
    p.feed(dom)
    n_ok = sum(r[2] == "ok" for r in DETS)
    for h in ("Counts", "Per class", "Detections", "Per detected class", "Per detection",
              f"Top {n_ok} detections by invalid activation ratio"):
        assert h in p.headings, (h, p.headings)
    tables = {tuple(t[0]): t[1:] for t in p.tables if t}
    counts = tables[("images", "detections", "rows", "ok", "no_activation", "error", "no_detection", "missed")]
    assert counts == [["4", "7", "9", "5", "1", "1", "1", "1"]]
    per_det = next(rows for head, rows in tables.items() if head[:4] == ("image", "row", "detection", "status"))
    assert [(r[1], r[2], r[3], r[4]) for r in per_det] == [
        ("0", "0", "ok", "car"), ("0", "1", "ok", "person"), ("1", "0", "ok", "car"), ("1", "1", "ok", "car"),
        ("1", "2", "no_activation", "person"), ("1", "n/a", "missed", "person"), ("2", "n/a", "no_detection", ""),
        ("3", "0", "ok", "dog"), ("3", "1", "error", "person")]
    first = per_det[0]
    assert first[5:] == ["0.900", "20, 10, 60, 50", "0 (IoU 0.80)", "0.700", "0.400", "0.200"]
    per_class = tables[("class", "detections", "ok", "missed", "mean score", "mean ratio", "mean outside box",
                        "mean box invalid area")]
    assert [r[:4] for r in per_class] == [["person", "3", "1", "1"], ["car", "3", "3", "0"], ["dog", "1", "1", "0"]]
    # the gallery: every ok detection with its picture, named by image and detection
    assert p.imgs == n_ok
    assert "#1 img3 (row 3, detection 0)" in dom and "detected: car 0.90 IoU 0.80 · box 20, 10, 60, 50" in dom
    assert "outside box 0.400 · box invalid area 0.200" in dom and "white rectangle: the box" in dom
    assert "explaining each detection's box score" in dom
    assert tables[("image", "error")] == [["img3 (detection 1)", "model: NaN in the map"]]


def test_record_and_junit_count_images_and_detections(det_run):
    decision, files = report.artifacts(det_run["results"], POLICY, images=False)
    rec = json.loads(files["record.json"])
    assert rec["task"] == "detection"
    assert rec["detection"] == {"task": "detection", "images": 4, "rows": 9, "detections": 7, "explained": 6,
                                "ok": 5, "no_activation": 1, "error": 1, "no_detection": 1, "missed": 1}
    assert rec["data"]["counts"]["missed"] == 1 and rec["data"]["counts"]["no_detection"] == 1
    robust = next(q["shows"] for q in rec["requirements"] if q["key"] == "robustness")
    assert robust.startswith("On 4 test images, 7 detections were found and 6 explained (1 ground-truth boxes "
                             "missed, 1 images without a detection)")
    suite = ET.fromstring(files["junit.xml"]).find("testsuite")
    names = [(c.get("classname"), c.get("name")) for c in suite.iter("testcase")]
    assert len(names) == len(decision.rules) == len(set(names))  # unique, per class scope too
    assert {c for c, _ in names} >= {"camgate.det.class=car", "camgate.det.class=person", "camgate.det.class=dog"}
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props == {"task": "detection", "images": "4", "detections": "7", "explained": "6", "missed": "1",
                     "no_detection": "1", "error": "1"}
    assert "detection run: 4 images, 7 detections (6 explained), 1 missed" in suite.find("system-out").text
    md = files["summary.md"].decode()
    assert "| images | detections | rows | ok | no_activation | error | no_detection | missed |" in md
    assert "| 4 | 7 | 9 | 5 | 1 | 1 | 1 | 1 |" in md
    assert "## Top 5 detections by invalid activation ratio" in md
    assert "| img3 | 0 | dog | 0.800 | 24, 12, 58, 48 | n/a | 0.900 |" in md


def test_a_detection_run_is_told_by_its_metadata(det_run):
    t = res.read_table(det_run["results"], ["row", "status"])
    assert detection.is_detection(t)  # no det_index column: the metadata says detection
    assert not detection.is_detection(t.replace_schema_metadata(res.schema(None, metadata("classification")).metadata))
    assert detection.row_key({"row": 3}) == 3 and detection.row_key({"row": 3, "det_index": None}) == 3
    assert detection.row_key({"row": 3, "det_index": 1}) == (3, 1)


def test_a_classification_table_renders_as_before():
    from test_report import POLICY as CLS_POLICY
    from test_report import results

    from camgate.gating.decision import evaluate

    t = results()
    d = evaluate(t, CLS_POLICY)
    md = report.markdown(d, t, top=2)
    assert "| rows | ok | no_activation | error |\n|---|---|---|---|\n| 7 | 3 | 1 | 3 |" in md
    assert "## Top 2 images by invalid activation ratio" in md
    page = report.html(d, t, top=3, images={0: b"\x89PNG\r\n\x1a\nfake"})
    for absent in ("Detections", "no_detection", "missed", "detection", "white rectangle"):
        assert absent not in md and absent not in page, absent
    assert page.count('<img class="overlay"') == 1  # still keyed by row
    assert b"<properties>" not in report.junit(d, record={"model": {}})


def test_a_report_reads_a_detection_table_in_memory(det_run):
    from camgate.gating.decision import evaluate

    t = pq.read_table(det_run["results"])
    md = report.markdown(evaluate(t, POLICY), t)
    assert "## Detections" in md and "| img2 | 2 | n/a | no_detection |" in md
