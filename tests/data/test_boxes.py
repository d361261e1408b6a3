"""camgate.data.boxes: boxes cells, COCO annotations, greedy matching; box geometry; boxes in manifests."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from camgate.data.boxes import GtBox, load_coco, match, parse_boxes
from camgate.data.geometry import InputSpec
from camgate.data.manifest import DataError, load_items
from camgate.errors import ConfigError
from camgate.io import storage

CLASSES = ["__background__", "person", "car", "dog"]


def parse(cell, classes=CLASSES, num_classes=4, size=(100, 80)):
    return parse_boxes(cell, classes, num_classes, size)


# --- parse_boxes ---------------------------------------------------------------------------------

def test_parse_json_text_and_lists_with_names_and_indices():
    text = '[{"box": [1, 2, 30, 40], "label": "person"}, {"box": [0.5, 0, 100, 80], "label": 3}]'
    want = [GtBox((1.0, 2.0, 30.0, 40.0), 1), GtBox((0.5, 0.0, 100.0, 80.0), 3)]
    assert parse(text) == want
    assert parse(json.loads(text)) == want
    assert parse([{"box": np.array([1, 2, 30, 40], dtype=np.float32), "label": np.int64(1)}]) == want[:1]
    assert parse([{"box": (1, 2, 30, 40), "label": "1"}]) == want[:1]  # CSV-ish index text
    assert parse([{"box": [1, 2, 30, 40], "label": 2.0}]) == [GtBox((1.0, 2.0, 30.0, 40.0), 2)]
    assert all(isinstance(v, float) for v in parse(text)[0].box)
    # extra keys are carried by exports (ids, areas): ignored
    assert parse([{"box": [1, 2, 3, 4], "label": 1, "id": 7, "area": 4}]) == [GtBox((1.0, 2.0, 3.0, 4.0), 1)]


def test_parse_empty_cell_means_no_ground_truth_and_empty_list_no_objects():
    for cell in (None, "", "  ", float("nan")):
        assert parse(cell) is None
    assert parse("[]") == [] and parse([]) == []


def test_parse_without_class_names_takes_indices_and_no_size_skips_the_border():
    assert parse_boxes('[{"box": [1, 2, 3, 4], "label": 5}]', None, 10, None) == [GtBox((1.0, 2.0, 3.0, 4.0), 5)]
    assert parse_boxes([{"box": [-50, 0, 1e6, 9], "label": 0}], None, 1, None)[0].box == (-50.0, 0.0, 1e6, 9.0)


def test_parse_allows_a_pixel_beyond_the_border():
    assert parse([{"box": [-1, -0.5, 101, 81], "label": 1}])[0].box == (-1.0, -0.5, 101.0, 81.0)


@pytest.mark.parametrize("cell, message", [
    ("[{\"box\": [1, 2, 3, 4]", r"boxes: not valid JSON \(.*\); expected a list of \{\"box\""),
    ('{"box": [1, 2, 3, 4], "label": 1}', r"boxes: expected a list of .*, got dict"),
    (7, r"boxes: expected a list of .*, got int 7"),
    ("[[1, 2, 3, 4]]", r"box 0: expected an object .*, got list \[1, 2, 3, 4\]"),
    ('[{"box": [1, 2, 3, 4], "label": 1}, {"label": 1}]', r"box 1: no 'box'"),
    ('[{"box": [1, 2, 3, 4]}]', r"box 0: no 'label'"),
    ('[{"box": [1, 2, 3, 4], "label": null}]', r"box 0: no 'label'"),
    ('[{"box": [1, 2, 3], "label": 1}]', r"box 0: 'box' must be \[x1, y1, x2, y2\], got \[1, 2, 3\]"),
    ('[{"box": "1 2 3 4", "label": 1}]', r"box 0: 'box' must be \[x1, y1, x2, y2\]"),
    ('[{"box": [1, "2", 3, 4], "label": 1}]', r"box 0: y1 is not a number: '2'"),
    ('[{"box": [1, 2, true, 4], "label": 1}]', r"box 0: x2 is not a number: True"),
    ('[{"box": [1, 2, null, 4], "label": 1}]', r"box 0: x2 is not a number: None"),
    ('[{"box": [1, 2, 3, NaN], "label": 1}]', r"box 0: y2 is not finite: nan"),
    ('[{"box": [-Infinity, 2, 3, 4], "label": 1}]', r"box 0: x1 is not finite: -inf"),
    ('[{"box": [10, 2, 10, 4], "label": 1}]', r"box 0: \[10, 2, 10, 4\] is empty: x2 must exceed x1 .*not \[x, y, w"),
    ('[{"box": [1, 5, 3, 4], "label": 1}]', r"box 0: \[1, 5, 3, 4\] is empty"),
    ('[{"box": [1, 2, 3, 4], "label": 1}, {"box": [1, 2, 102, 40], "label": 1}]',
     r"box 1: \[1, 2, 102, 40\] lies outside the 100x80 image \(x2 102\)"),
    ('[{"box": [-2, -3, 3, 4], "label": 1}]', r"box 0: .* lies outside the 100x80 image \(x1 -2, y1 -3\)"),
    ('[{"box": [1, 2, 3, 81.5], "label": 1}]', r"outside the 100x80 image \(y2 81.5\)"),
    ('[{"box": [1, 2, 3, 4], "label": "cat"}]', r"box 0: label 'cat' is not one of \['__background__'"),
    ('[{"box": [1, 2, 3, 4], "label": 4}]', r"box 0: label 4 is outside the model's 4 classes"),
    ('[{"box": [1, 2, 3, 4], "label": -1}]', r"box 0: label -1 is outside the model's 4 classes"),
    ('[{"box": [1, 2, 3, 4], "label": true}]', r"box 0: label must be a class name or index, got True"),
    ('[{"box": [1, 2, 3, 4], "label": [1]}]', r"box 0: label must be a class name or index, got \[1\]"),
    ('[{"box": [1, 2, 3, 4], "label": 1.5}]', r"box 0: label 1.5 is not one of"),
])
def test_parse_refuses_bad_cells_naming_the_problem_and_the_box(cell, message):
    with pytest.raises(ValueError, match=message):
        parse(cell)


def test_parse_names_need_class_names():
    with pytest.raises(ValueError, match=r"box 0: label 'dog' is not a class index \(the model card lists no class"):
        parse_boxes([{"box": [1, 2, 3, 4], "label": "dog"}], None, 4, None)


# --- COCO ----------------------------------------------------------------------------------------

def coco_doc(**changes) -> dict:
    doc = {
        "images": [{"id": 1, "file_name": "000001.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "val/000002.jpg", "width": 50, "height": 50},
                   {"id": 3, "file_name": "000003.jpg", "width": 50, "height": 50}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 18, "iscrowd": 0},
            {"id": 11, "image_id": 1, "bbox": [0, 0, 100, 80], "category_id": 1, "iscrowd": 1},  # crowd: left out
            {"id": 12, "image_id": 1, "bbox": [1.5, 2.5, 3, 4], "category_id": 1},
            {"id": 13, "image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 3, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    doc.update(changes)
    return doc


def write_coco(tmp_path, doc, name="instances.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_coco_boxes_become_xyxy_cells_by_category_name(tmp_path):
    coco = load_coco(write_coco(tmp_path, coco_doc()))
    cell = coco.cell_for(str(tmp_path / "images" / "000001.jpg"))
    assert cell == [{"box": [10, 20, 40, 60], "label": "dog", "category_id": 18},
                    {"box": [1.5, 2.5, 4.5, 6.5], "label": "person", "category_id": 1}]
    coco91 = ["__background__", "person", "bicycle", "car"] + [f"c{i}" for i in range(4, 18)] + ["dog"]
    assert parse_boxes(cell, coco91, 91, (100, 80)) == [GtBox((10.0, 20.0, 40.0, 60.0), 18),
                                                        GtBox((1.5, 2.5, 4.5, 6.5), 1)]
    # a card without class names: the category ids are the indices
    assert [g.label for g in parse_boxes(cell, None, 91, (100, 80))] == [18, 1]
    # names the card does not have: that image's error
    with pytest.raises(ValueError, match="box 0: label 'dog' is not one of"):
        parse_boxes(cell, CLASSES[:3], 3, (100, 80))
    assert coco.cell_for("s3://bucket/set/000003.jpg") == []  # in the file, no objects
    assert coco.cell_for("s3://bucket/set/000004.jpg") is None  # not in the file: no ground truth
    assert coco.image_for("000001.jpg").width == 100
    cell[0]["box"][0] = 99  # callers get their own copies
    assert coco.cell_for("000001.jpg")[0]["box"][0] == 10


def test_coco_file_names_with_folders_match_by_suffix_or_basename(tmp_path):
    coco = load_coco(write_coco(tmp_path, coco_doc()))
    want = [{"box": [0, 0, 5, 5], "label": "car", "category_id": 3}]
    assert coco.cell_for("s3://b/coco/val/000002.jpg") == want
    assert coco.cell_for("/data/flat/000002.jpg") == want  # the only image of that basename
    assert coco.cell_for("/data/val/000002.png") is None


def test_coco_ambiguous_file_names(tmp_path):
    images = coco_doc()["images"] + [{"id": 4, "file_name": "train/000002.jpg", "width": 9, "height": 9},
                                     {"id": 5, "file_name": "./000001.jpg", "width": 9, "height": 9}]
    with pytest.raises(DataError, match=r"instances.json: images\[4\]: file_name './000001.jpg' appears twice "
                                         r"\(image ids 1 and 5\)"):
        load_coco(write_coco(tmp_path, coco_doc(images=images[:4] + images[4:])))
    coco = load_coco(write_coco(tmp_path, coco_doc(images=images[:4])))
    assert coco.cell_for("/x/train/000002.jpg") == []  # the path tells them apart
    assert coco.cell_for("/x/val/000002.jpg")[0]["label"] == "car"
    with pytest.raises(DataError, match=r"image /x/000002.jpg matches several images: id 2 'val/000002.jpg', "
                                        r"id 4 'train/000002.jpg'"):
        coco.cell_for("/x/000002.jpg")


@pytest.mark.parametrize("doc, message", [
    ([], r"expected a JSON object with lists 'images', 'annotations' and 'categories'"),
    ({"images": []}, r"expected a JSON object with lists"),
    (coco_doc(images=[{"id": "1", "file_name": "a.jpg", "width": 1, "height": 1}]),
     r"images\[0\]: 'id' must be an integer, got '1'"),
    (coco_doc(images=[{"id": 1, "width": 1, "height": 1}]), r"images\[0\]: 'file_name' must be a file name"),
    (coco_doc(images=[{"id": 1, "file_name": "a.jpg", "width": 1, "height": 1},
                      {"id": 1, "file_name": "b.jpg", "width": 1, "height": 1}], annotations=[]),
     r"image id 1 appears twice"),
    (coco_doc(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], annotations=[]),
     r"categories\[1\]: id 1 appears twice \('a' and 'b'\)"),
    (coco_doc(annotations=[{"image_id": 9, "bbox": [0, 0, 1, 1], "category_id": 1}]),
     r"annotations\[0\]: image_id 9 is not in 'images'"),
    (coco_doc(annotations=[{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 2}]),
     r"annotations\[0\]: category_id 2 is not in 'categories'"),
    (coco_doc(annotations=[{"image_id": 1, "bbox": [0, 0, 1], "category_id": 1}]),
     r"annotations\[0\]: 'bbox' must be \[x, y, width, height\], got \[0, 0, 1\]"),
    (coco_doc(annotations=["x"]), r"annotations\[0\]: expected an object, got str 'x'"),
])
def test_coco_files_that_are_not_coco_are_data_errors(tmp_path, doc, message):
    with pytest.raises(DataError, match=r"COCO annotations .*instances.json: " + message):
        load_coco(write_coco(tmp_path, doc))


def test_coco_unreadable_files_are_data_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"COCO annotations .*bad.json: not valid JSON"):
        load_coco(str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match=r"cannot read COCO annotations .*gone.json"):
        load_coco(str(tmp_path / "gone.json"))

    def denied(uri):
        raise storage.AccessDenied(f"access denied: {uri}", uri=uri)

    monkeypatch.setattr(storage, "read_bytes", denied)
    with pytest.raises(DataError, match=r"cannot read COCO annotations s3://b/instances.json: access denied") as e:
        load_coco("s3://b/instances.json")
    assert isinstance(e.value, ConfigError)


def test_coco_degenerate_boxes_are_the_images_error_not_the_files(tmp_path):
    coco = load_coco(write_coco(tmp_path, coco_doc(
        annotations=[{"image_id": 3, "bbox": [5, 5, 0, 3], "category_id": 1}])))
    with pytest.raises(ValueError, match=r"box 0: \[5, 5, 5, 8\] is empty"):
        parse_boxes(coco.cell_for("000003.jpg"), None, 91, (50, 50))


# --- match ---------------------------------------------------------------------------------------

def gts(*boxes, label=1):
    return [GtBox(tuple(float(v) for v in b), label) for b in boxes]


def test_match_greedy_by_score():
    gt = gts([0, 0, 10, 10], [20, 0, 30, 10])
    dets = [[0, 0, 10, 10], [20, 0, 30, 10]]
    assert match(dets, [1, 1], [0.3, 0.9], gt) == [(0, 0, 1.0), (1, 1, 1.0)]
    # tensors, as a detector returns them
    out = match(torch.tensor(dets, dtype=torch.float32), torch.tensor([1, 1]), torch.tensor([0.3, 0.9]), gt)
    assert out == [(0, 0, 1.0), (1, 1, 1.0)]


def test_match_two_gts_competing_for_one_detection():
    gt = gts([0, 0, 10, 10], [1, 0, 11, 10])
    # the one detection overlaps GT 1 better: GT 0 stays unmatched
    (g0, g1) = match([[1, 0, 11, 10]], [1], [0.9], gt)
    assert g0 == (0, None, None) and g1 == (1, 0, 1.0)
    # the higher score picks first, and takes its best GT; the next takes what is left
    out = match([[0.5, 0, 10.5, 10], [0.5, 0, 10.5, 10]], [1, 1], [0.5, 0.8], gt)
    assert [(g, d) for g, d, _ in out] == [(0, 1), (1, 0)]
    # equal IoUs: the first GT
    assert match([[0.5, 0, 10.5, 10]], [1], [0.9], gt)[0][1] == 0


def test_match_label_must_agree_and_threshold():
    gt = gts([0, 0, 10, 10]) + gts([0, 0, 10, 10], label=2)
    out = match([[0, 0, 10, 10]], [2], [0.9], gt)
    assert out == [(0, None, None), (1, 0, 1.0)]
    half = [[0, 0, 10, 5]]  # IoU 0.5 exactly with GT 0
    assert match(half, [1], [0.9], gt)[0] == (0, 0, 0.5)
    assert match(half, [1], [0.9], gt, iou_threshold=0.51)[0] == (0, None, None)
    iou = match([[0, 0, 10, 4]], [1], [0.9], gt, iou_threshold=0.3)[0][2]
    assert math.isclose(iou, 0.4)


def test_match_a_higher_scored_detection_takes_the_gt_first_even_if_a_lower_one_fits_better():
    gt = gts([0, 0, 10, 10])
    out = match([[0, 0, 10, 10], [0, 0, 10, 7]], [1, 1], [0.2, 0.9], gt)
    assert out[0][1] == 1 and math.isclose(out[0][2], 0.7)


def test_match_empty_inputs():
    gt = gts([0, 0, 10, 10])
    assert match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0), gt) == [(0, None, None)]
    assert match([], [], [], gt) == [(0, None, None)]
    assert match([[0, 0, 1, 1]], [1], [0.5], []) == []
    with pytest.raises(ValueError, match="2 boxes, 1 labels and 2 scores"):
        match([[0, 0, 1, 1], [0, 0, 1, 1]], [1], [0.5, 0.4], gt)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        match([], [], [], gt, iou_threshold=1.5)


# --- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, size", [
    (InputSpec(size=(224, 224)), (640, 480)),
    (InputSpec(size=(300, 400), resize="stretch"), (333, 517)),
    (InputSpec(size=(224, 224), resize="center_crop"), (640, 480)),
    (InputSpec(size=(224, 224), resize="center_crop", resize_to=240), (301, 777)),
    (InputSpec(size=(200, 300), resize="center_crop", resize_to=256), (500, 500)),
])
def test_box_coordinates_round_trip(spec, size):
    box = (12.5, 30.0, 250.0, 201.25)
    there = spec.box_to_input(box, size)
    assert np.allclose(spec.box_from_input(there, size), box)
    assert np.allclose(spec.box_to_input(spec.box_from_input(there, size), size), there)
    left, top, right, bottom = spec.box(*size)
    h, w = spec.size
    # the seen region's corners are the input's corners
    assert np.allclose(spec.box_to_input((left, top, right, bottom), size), (0, 0, w, h))
    region = spec.box_to_region(box, size)
    assert np.allclose(region, (box[0] - left, box[1] - top, box[2] - left, box[3] - top))
    # region pixels -> input pixels: the resize of the region alone
    sx, sy = w / (right - left), h / (bottom - top)
    assert np.allclose(there, (region[0] * sx, region[1] * sy, region[2] * sx, region[3] * sy))


def test_box_coordinates_stretch_and_center_crop_values():
    stretch = InputSpec(size=(100, 200))  # (H, W)
    assert stretch.box_to_input((0, 0, 400, 50), (400, 100)) == (0.0, 0.0, 200.0, 50.0)
    assert stretch.box_to_region((1, 2, 3, 4), (400, 100)) == (1.0, 2.0, 3.0, 4.0)
    crop = InputSpec(size=(224, 224), resize="center_crop", resize_to=224)  # no border: crop = 480x480 centre
    assert crop.box(640, 480) == (80, 0, 560, 480)
    assert crop.box_to_region((80, 0, 560, 480), (640, 480)) == (0.0, 0.0, 480.0, 480.0)
    assert crop.box_to_input((80, 0, 560, 480), (640, 480)) == (0.0, 0.0, 224.0, 224.0)
    assert crop.box_to_input((0, 0, 80, 10), (640, 480))[:3] == (-80 * 224 / 480, 0.0, 0.0)  # left of the crop
    assert crop.box_from_input(torch.tensor([0.0, 0.0, 112.0, 112.0]), (640, 480)) == (80.0, 0.0, 320.0, 240.0)


# --- manifests -----------------------------------------------------------------------------------

BOXES = [{"box": [1, 2, 3, 4], "label": "person"}, {"box": [0, 0, 5, 5], "label": 2}]


def test_manifest_boxes_column_csv(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image,boxes,site\n"
        f"a.png,\"{json.dumps(BOXES).replace(chr(34), chr(34) * 2)}\",n\n"
        "b.png,,n\n"
        "c.png,[],s\n"
        "d.png,not json,s\n")
    a, b, c, d = load_items(str(tmp_path / "m.csv"))
    assert json.loads(a.boxes) == BOXES and b.boxes is None and c.boxes == "[]" and d.boxes == "not json"
    assert a.meta == {"site": "n"} and all(it.error is None for it in (a, b, c, d))
    assert parse_boxes(a.boxes, CLASSES, 4, None) == [GtBox((1.0, 2.0, 3.0, 4.0), 1), GtBox((0.0, 0.0, 5.0, 5.0), 2)]
    assert parse_boxes(b.boxes, CLASSES, 4, None) is None and parse_boxes(c.boxes, CLASSES, 4, None) == []
    with pytest.raises(ValueError, match="not valid JSON"):  # that item's error, not the run's
        parse_boxes(d.boxes, CLASSES, 4, None)


def test_manifest_boxes_csv_column_is_never_taken_for_numbers(tmp_path):
    (tmp_path / "m.csv").write_text("image,boxes\na.png,7\nb.png,\n")
    a, b = load_items(str(tmp_path / "m.csv"))
    assert a.boxes == "7" and b.boxes is None


def test_manifest_boxes_column_jsonl_and_parquet(tmp_path):
    lines = [{"image": "a.png", "boxes": BOXES}, {"image": "b.png"}, {"image": "c.png", "boxes": []},
             {"image": "d.png", "boxes": None, "site": 3}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    a, b, c, d = load_items(str(tmp_path / "m.jsonl"))
    assert a.boxes == BOXES and b.boxes is None and c.boxes == [] and d.boxes is None
    assert "boxes" not in a.meta and d.meta == {"site": 3}
    table = pa.table({"image": ["a.png", "b.png"],
                      "boxes": [[{"box": [1.0, 2.0, 3.0, 4.0], "label": "car"}], None]})
    pq.write_table(table, tmp_path / "m.parquet")
    a, b = load_items(str(tmp_path / "m.parquet"))
    assert parse_boxes(a.boxes, CLASSES, 4, (10, 10)) == [GtBox((1.0, 2.0, 3.0, 4.0), 2)] and b.boxes is None
    assert a.meta == {}


def test_shard_manifests_carry_boxes(tmp_path):
    from camgate.runner.shards import plan

    lines = [{"image": "a.png", "boxes": BOXES, "site": "n"}, {"image": "b.png"},
             {"image": "c.png", "boxes": "[{\"box\": [1, 2], \"label\": 1}]"}, {"image": "d.png", "boxes": []}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    items = load_items(str(tmp_path / "m.jsonl"))
    shards = plan(str(tmp_path / "m.jsonl"), 2, str(tmp_path / "s"))
    back = [it for s in shards for it in load_items(s)]
    assert [it.index for it in back] == [0, 1, 2, 3] and back[0].meta == {"site": "n"}
    assert back[1].boxes is None
    for orig, shard in zip(items, back):
        if orig.boxes is None:
            continue
        try:
            want = parse_boxes(orig.boxes, CLASSES, 4, None)
        except ValueError as e:
            with pytest.raises(ValueError, match=re.escape(str(e))):
                parse_boxes(shard.boxes, CLASSES, 4, None)
        else:
            assert parse_boxes(shard.boxes, CLASSES, 4, None) == want
