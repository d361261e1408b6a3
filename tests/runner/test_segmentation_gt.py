"""Ground truth in `camgate run` for segmentation and multi-label models: the manifest's ``regions``
label maps (classes and regions from the ground truth, cut and resized like the image, bad label maps
as row errors), the manifest's labels of a multi-label model (``target='label'``), the run identity and
resume fingerprint, sharded runs equal to one run, and the Python API's rows of these tasks.

tests/zoo.py's RegionSegmenter (input 48 x 64): class 1 predicted on [0, 0, 32, 24], class 2 on
[40, 24, 64, 48] (xyxy), class 0 elsewhere.
"""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import png
from test_segmentation_run import card, ml_card, rows_of, same

from camgate.errors import ConfigError
from camgate.io import results as res
from camgate.runner import analyze
from camgate.runner.heatmaps import run

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 48, 64


def label_map(h=H, w=W, boxes=((1, (0, 0, 32, 24)), (2, (40, 12, 64, 36))), void=(0, 44, 32, 48)):
    a = np.zeros((h, w), np.uint8)
    for c, (x1, y1, x2, y2) in boxes:
        a[y1:y2, x1:x2] = c
    if void:
        x1, y1, x2, y2 = void
        a[y1:y2, x1:x2] = 255
    return a


def gt_set(folder, maps, size=(H, W), labels=None, name="data.jsonl"):
    """One image per entry of ``maps``: a label map array, raw bytes, a missing file ('missing') or None
    (an empty regions cell); masks mark class 1's predicted region invalid."""
    rng = np.random.default_rng(0)
    for d in ("images", "masks", "gt"):
        (folder / d).mkdir(exist_ok=True)
    h, w = size
    rows = []
    for i, m in enumerate(maps):
        (folder / "images" / f"{i}.png").write_bytes(png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2, : w // 2] = 255
        (folder / "masks" / f"{i}.png").write_bytes(png(mask))
        row = {"image": f"images/{i}.png", "mask": f"masks/{i}.png"}
        if isinstance(m, np.ndarray):
            (folder / "gt" / f"{i}.png").write_bytes(png(m))
        elif isinstance(m, bytes):
            (folder / "gt" / f"{i}.png").write_bytes(m)
        if m is not None:
            row["regions"] = f"gt/{i}.png"
        if labels is not None:
            row["label"] = labels[i]
        rows.append(row)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def identity(path):
    return json.loads(pq.read_schema(path).metadata[b"camgate"])["identity"]


def test_ground_truth_regions_give_the_classes_and_regions_and_bad_label_maps_are_row_errors(tmp_path):
    bad_class = label_map(boxes=((1, (0, 0, 32, 24)), (5, (40, 24, 64, 48))))
    maps = [label_map(), label_map(), bad_class, label_map(10, 10), b"not an image", None, "missing"]
    data = gt_set(tmp_path, maps)
    out = tmp_path / "r.parquet"
    s = run(card(tmp_path), data, str(out), progress=False)
    rows = rows_of(out)
    assert s.rows == len(rows) == 2 * 3 + 5
    by_image = {}
    for r in rows:
        by_image.setdefault(r["row"], []).append(r)
    assert sorted(by_image) == list(range(7))  # every image keeps at least one row
    area = {0: H * W - 32 * 24 - 24 * 24 - 4 * 32, 1: 32 * 24, 2: 24 * 24}  # void pixels are no class
    for i in (0, 1):
        got = by_image[i]
        assert [r["target_class"] for r in got] == [0, 1, 2]
        assert {r["target_class"]: r["region_pixels"] for r in got} == area
        c1 = got[1]  # class 1's ground truth is its predicted region, masked invalid
        assert c1["status"] == "ok" and c1["outside_region_ratio"] < 0.1 and c1["region_invalid_area"] == 1.0
        assert got[2]["status"] == "ok" and got[2]["region_invalid_area"] == 0.0
    errors = {i: by_image[i][0] for i in range(2, 7)}
    assert all(len(by_image[i]) == 1 and r["status"] == "error" and f"images/{i}.png" in r["error"]
               for i, r in errors.items())
    assert "class 5 is not a class of the model" in errors[2]["error"] and "gt/2.png" in errors[2]["error"]
    assert "10x10 pixels, its image 64x48" in errors[3]["error"]
    assert "not a recognised image format" in errors[4]["error"]
    assert "no ground-truth label map" in errors[5]["error"]
    assert "gt/6.png" in errors[6]["error"] and errors[6]["error_kind"] == "input"
    ident = identity(out)
    assert ident["regions"] == "ground_truth" and ident["classes"] is None
    # named classes on the ground truth: one absent from it is a no_region row saying so
    run(card(tmp_path), data, str(tmp_path / "n.parquet"), classes="b", progress=False)
    named = [r for r in rows_of(tmp_path / "n.parquet") if r["row"] < 2]
    assert [(r["target_class"], r["region_pixels"]) for r in named] == [(2, 24 * 24)] * 2


def test_no_class_in_the_ground_truth_and_an_absent_named_class(tmp_path):
    void = np.full((H, W), 255, np.uint8)
    data = gt_set(tmp_path, [void, label_map(boxes=((1, (0, 0, 32, 24)),))])
    out = tmp_path / "r.parquet"
    run(card(tmp_path), data, str(out), progress=False)
    rows = rows_of(out)
    assert [(r["row"], r["target_class"], r["status"]) for r in rows][:1] == [(0, None, "no_region")]
    assert "gt/0.png" in rows[0]["error"] and "no class" in rows[0]["error"]
    run(card(tmp_path), data, str(tmp_path / "n.parquet"), classes="2", progress=False)
    rows = rows_of(tmp_path / "n.parquet")
    assert [(r["row"], r["target_class"], r["status"]) for r in rows] == [(0, 2, "no_region"), (1, 2, "no_region")]


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_label_maps_are_cut_and_resized_like_their_images(tmp_path, resize):
    if resize == "stretch":  # twice the input's size: each region shrinks by 2 x 2
        size, boxes = (2 * H, 2 * W), ((1, (0, 0, 64, 48)), (2, (80, 48, 128, 96)))
        c = card(tmp_path)
    else:  # 48 x 96 images: the centre 48 x 64 is seen; class 2 lies in the part cut away
        size, boxes = (H, 96), ((1, (16, 0, 48, 24)), (2, (0, 30, 16, 48)))
        c = card(tmp_path, input={"size": [H, W], "resize": "center_crop", "resize_to": H})
    data = gt_set(tmp_path, [label_map(*size, boxes=boxes, void=None)], size=size)
    out = tmp_path / "r.parquet"
    run(c, data, str(out), progress=False)
    rows = {r["target_class"]: r for r in rows_of(out)}
    assert rows[1]["region_pixels"] == 32 * 24 and rows[1]["outside_region_ratio"] < 0.1
    assert (rows[1]["region_height"], rows[1]["region_width"]) == (H, W)
    assert sorted(rows) == ([0, 1, 2] if resize == "stretch" else [0, 1])


def test_ground_truth_run_equals_heatmaps_then_analyze_and_resume_sees_the_regions(tmp_path):
    from camgate.data.manifest import load_items
    from camgate.runner.identity import fingerprint

    c, data = card(tmp_path), gt_set(tmp_path, [label_map(), label_map(boxes=((2, (0, 0, 64, 48)),))])
    run(c, data, str(tmp_path / "r.parquet"), progress=False)
    run(c, data, str(tmp_path / "h.parquet"), analyze=False, progress=False)
    analyze(str(tmp_path / "h.parquet"), str(tmp_path / "a.parquet"), data=data, progress=False)
    a, b = rows_of(tmp_path / "r.parquet"), rows_of(tmp_path / "a.parquet")
    assert [(r["row"], r["target_class"]) for r in a] == [(0, 0), (0, 1), (0, 2), (1, 2)]
    for x, y in zip(a, b):
        for k in ("row", "target_class", "status", "invalid_activation_ratio", "outside_region_ratio",
                  "region_invalid_area", "region_pixels"):
            assert same(x[k], y[k]), k
    assert identity(tmp_path / "h.parquet")["regions"] == "ground_truth"
    # the regions cell is part of what the rows depend on: another label map, another resume fingerprint
    items = load_items(data)
    other = load_items(data)
    other[0].regions = other[1].regions
    assert fingerprint({}, items) != fingerprint({}, other)
    plain = load_items(data)
    for it in plain:
        it.regions = None
    assert fingerprint({}, plain) != fingerprint({}, items)


def test_predicted_regions_are_recorded_and_a_regions_column_needs_a_segmentation_model(tmp_path):
    data = gt_set(tmp_path, [label_map()], labels=["0"])
    out = tmp_path / "p.parquet"
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "regions"}) + "\n"
                             for line in open(data)))
    run(card(tmp_path), str(plain), str(out), progress=False)
    assert identity(out)["regions"] == "predicted"
    with pytest.raises(ConfigError, match="regions column .* applies to segmentation models"):
        run(ml_card(tmp_path), data, str(tmp_path / "m.parquet"), progress=False)


def test_multilabel_rows_per_manifest_label(tmp_path):
    labels = ["0;2", "b", "", "7", "a; 0 ;a"]
    data = gt_set(tmp_path, [None] * len(labels), labels=labels)
    out = tmp_path / "m.parquet"
    s = run(ml_card(tmp_path), data, str(out), target="label", progress=False)
    rows = rows_of(out)
    assert s.rows == len(rows)
    got = [(r["row"], r["target_class"], r["status"]) for r in rows]
    assert [(i, c) for i, c, _ in got] == [(0, 0), (0, 2), (1, 2), (2, None), (3, None), (4, 1), (4, 0)]
    assert got[3][2] == "no_label" and "no label in the manifest" in rows[3]["error"] and "images/2.png" in rows[3][
        "error"]
    assert got[4][2] == "error" and "label 7 is outside" in rows[4]["error"] and "images/3.png" in rows[4]["error"]
    assert all(st in ("ok", "no_activation") for i, _, st in got if i in (0, 1, 4))
    ident = identity(out)
    assert ident["target"] == "label" and "score_threshold" not in ident
    # the predicted labels' run records its threshold instead
    run(ml_card(tmp_path), data, str(tmp_path / "p.parquet"), progress=False)
    assert identity(tmp_path / "p.parquet")["target"] == "predicted" and "score_threshold" in identity(
        tmp_path / "p.parquet")


def test_targets_that_do_not_apply_are_refused_before_any_data(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="target 'label' does not apply to a segmentation model"):
        run(card(tmp_path), missing, str(tmp_path / "o.parquet"), target="label")
    with pytest.raises(ConfigError, match="target '1' does not apply to a multi-label model.*--target label"):
        run(ml_card(tmp_path), missing, str(tmp_path / "o.parquet"), target="1")
    with pytest.raises(ConfigError, match="give one of them"):
        run(ml_card(tmp_path), missing, str(tmp_path / "o.parquet"), target="label", classes="0")


@pytest.mark.parametrize("gt", [False, True])
def test_shards_of_a_segmentation_run_merge_into_the_one_run(tmp_path, gt):
    from camgate.runner.shards import merge, plan, run_shard

    maps = [label_map(), label_map(10, 10), label_map(boxes=((2, (0, 0, 64, 48)),)), label_map()]
    data = gt_set(tmp_path, maps)
    if not gt:
        plain = tmp_path / "plain.jsonl"
        plain.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "regions"}) + "\n"
                                 for line in open(data)))
        data = str(plain)
    c = card(tmp_path)
    run(c, data, str(tmp_path / "one.parquet"), progress=False)
    shards = plan(data, 3, str(tmp_path / "shards"))
    parts = [run_shard(c, s)["part"] for s in shards]
    merge(parts, str(tmp_path / "merged.parquet"), data=data)
    one, merged = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "merged.parquet")
    cols = [c for c in one.column_names if c not in ("image", "mask")]  # shard manifests resolve URIs alike
    assert one.num_rows == (3 + 1 + 1 + 3 if gt else 4 * 3)
    a, b = one.select(cols).to_pylist(), merged.select(cols).to_pylist()
    assert len(a) == len(b) and all(x.keys() == y.keys() and all(same(x[k], y[k]) if isinstance(x[k], float)
                                                                 else x[k] == y[k] for k in x) for x, y in zip(a, b))
    ident = lambda t: res.run_metadata(t)["identity"]  # noqa: E731
    assert ident(one)["data"] == ident(merged)["data"]
    assert ident(merged)["regions"] == ("ground_truth" if gt else "predicted")


def test_the_python_api_gives_the_runs_rows(tmp_path):
    """camgate.explain / evaluate on a segmentation card: the rows, maps and metrics `camgate run` gives
    on the same images saved as PNG; a multi-label card's target='label' takes per-image label lists;
    an nn.Module of these tasks (whose output the call could not check without a card) is refused."""
    import camgate
    from test_segmentation_run import data_set
    from zoo import region_segmenter

    data = data_set(tmp_path)  # 3 images, class 1's region masked invalid
    out = tmp_path / "r.parquet"
    run(card(tmp_path), data, str(out), progress=False)
    rows = rows_of(out)
    imgs = [str(tmp_path / "images" / f"{i}.png") for i in range(3)]
    masks = [str(tmp_path / "masks" / f"{i}.png") for i in range(3)]
    ex = camgate.explain(card(tmp_path), imgs)
    mapped = [r for r in rows if r["cam"] is not None]
    assert ex.image_index.tolist() == [r["row"] for r in mapped] and ex.logits is None and ex.probs is None
    assert ex.target_class.tolist() == [r["target_class"] for r in mapped] == ex.predicted_class.tolist()
    for m, r in zip(ex.maps, mapped):
        np.testing.assert_array_equal(m.numpy(), res.cam_array(r))
    df, decision = camgate.evaluate(card(tmp_path), imgs, masks, policy={"per_class": "predicted", "rules": {
        "mean_invalid_activation_ratio": 0.5, "no_activation_rate": None}})
    cols = ["row", "target_class", "status", "invalid_activation_ratio", "outside_region_ratio",
            "region_invalid_area"]
    assert all(same(a, b) for x, y in zip(df[cols].to_dict("records"), [{k: r[k] for k in cols} for r in rows])
               for a, b in zip(x.values(), y.values())) and len(df) == len(rows)
    verdicts = {r.scope: r.verdict for r in decision.rules if r.rule == "mean_invalid_activation_ratio"}
    assert verdicts["class=a"] == "fail" and verdicts["class=b"] == "pass"
    # multi-label: the labels given, in order; named classes too
    ml = camgate.explain(ml_card(tmp_path), imgs[:2], target="label", labels=[["b", "a"], "background"])
    assert ml.image_index.tolist() == [0, 0, 1] and ml.target_class.tolist() == [2, 1, 0]
    assert camgate.explain(ml_card(tmp_path), imgs[:1], explained_classes=[0]).target_class.tolist() == [0]
    img = [np.zeros((H, W, 3), np.uint8)]
    with pytest.raises(ConfigError, match="not task 'multilabel'.*camgate.run"):
        camgate.explain(region_segmenter(), img, task="multilabel")
    with pytest.raises(ConfigError, match="task must be one of"):
        camgate.evaluate(region_segmenter(), img, np.zeros((H, W), bool), task="panoptic")
    with pytest.raises(ConfigError, match="explained_classes: for segmentation and multi-label"):
        camgate.explain(card(tmp_path, "tiny_cnn", task="classification", target_layer="features.2",
                             input={"size": [32, 32]}), img, explained_classes=[1])


def test_blackbox_rise_explains_the_ground_truth_regions(tmp_path):
    import yaml

    path = tmp_path / "cb.yaml"
    path.write_text(yaml.safe_dump({"name": "cb", "task": "segmentation", "kind": "callable",
                                    "arch": "zoo:segmenter_scores", "num_classes": 4, "input": {"size": [H, W]}}))
    data = gt_set(tmp_path, [label_map(), label_map(boxes=((3, (0, 0, 16, 16)),))])
    out = tmp_path / "b.parquet"
    run(str(path), data, str(out), method="rise", budget=8, seed=1, progress=False)
    rows = rows_of(out)
    assert [(r["row"], r["target_class"], r["region_pixels"]) for r in rows] == \
        [(0, 0, H * W - 32 * 24 - 24 * 24 - 4 * 32), (0, 1, 32 * 24), (0, 2, 24 * 24),
         (1, 0, H * W - 16 * 16 - 4 * 32), (1, 3, 16 * 16)]
    assert all(r["method"] == "rise" and r["status"] in ("ok", "no_activation") for r in rows)
    assert identity(out)["regions"] == "ground_truth" and identity(out)["budget"] == 8
