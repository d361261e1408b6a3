"""The demo's detection variant: ground-truth boxes, manifests, the FCOS factory, a tiny training run."""
import csv
import json

import numpy as np
import pytest
import torch
import torchvision
import yaml

from helpers import csv_rows, tree_bytes

from camgate.demo import detect, synth


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_box_is_tight_around_the_object(seed):
    invalid = synth.invalid_mask() > 0
    h, w = synth.DEFAULT_SIZE
    for label in range(3):
        img, box = synth.render(label, "clean", np.random.default_rng([seed, label]), return_box=True)
        # the keyword changes neither the image nor the rng stream
        np.testing.assert_array_equal(img, synth.render(label, "clean", np.random.default_rng([seed, label])))
        # the scene without the object (same draws): the difference is the object and its shadow
        empty, none = synth.render(3, "clean", np.random.default_rng([seed, label]), return_box=True)
        assert none is None
        diff = np.abs(img.astype(int) - empty.astype(int)).sum(-1) > 0
        x1, y1, x2, y2 = box
        assert all(isinstance(v, float) and v == int(v) for v in box)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        x1, y1, x2, y2 = map(int, box)
        ys, xs = np.nonzero(diff)
        assert ys.min() == y1  # nothing above the box; the object reaches its top row
        # the flat floor shadow (~0.04 of the object's height around the foot) may stick out sideways
        # and below; everything above it lies inside the box, which it touches left and right
        band = int(0.1 * (y2 - y1)) + 2
        body = ys < y2 - band
        assert (xs[body] >= x1).all() and (xs[body] < x2).all()
        inside = diff[y1:y2, x1:x2]
        assert inside[:, 0].any() and inside[:, -1].any() and inside[-1].any()
        assert inside.sum() > 0.2 * inside.size or label == 1  # a bike is thin lines
        # standing on the floor: the foot row's centre is a valid pixel
        assert not invalid[y2 - 1, (x1 + x2) // 2]


def test_detection_manifests(tmp_path):
    test_csv = detect.generate_detection(tmp_path / "a", "shortcut", n_train=8, n_test=8, seed=2)
    root = test_csv.parent
    again = detect.generate_detection(tmp_path / "b", "shortcut", n_train=8, n_test=8, seed=2)
    assert tree_bytes(root) == tree_bytes(again.parent)  # deterministic, byte for byte
    plain = synth.generate(tmp_path / "c", "shortcut", n_train=8, n_test=8, seed=2)
    for name in tree_bytes(plain.parent / "images"):  # the classification data set's images
        assert (root / "images" / name).read_bytes() == (plain.parent / "images" / name).read_bytes()
    h, w = synth.DEFAULT_SIZE
    for split in ("train", "test"):
        with open(root / f"{split}.csv", newline="") as f:
            assert next(csv.reader(f)) == ["image", "mask", "boxes", "label", "split", "variant"]
        rows = csv_rows(root / f"{split}.csv")
        assert [r["label"] for r in rows] == [r["label"] for r in csv_rows(plain.parent / f"{split}.csv")]
        for i, r in enumerate(rows):
            boxes = json.loads(r["boxes"])
            if r["label"] == "empty":
                assert boxes == []
                continue
            assert len(boxes) == 1 and boxes[0]["label"] == r["label"]
            x1, y1, x2, y2 = boxes[0]["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            # the box render() gives for this image's rng stream
            rng = np.random.default_rng([2, ("train", "test").index(split), i])
            _, box = synth.render(synth.CLASSES.index(r["label"]), "shortcut", rng, return_box=True)
            assert boxes[0]["box"] == list(box)
    x, targets = detect.load_manifest(test_csv)
    assert x.shape == (8, 3, h, w) and x.dtype == torch.uint8
    assert sum(len(t["labels"]) == 0 for t in targets) == 2  # two empty scenes of eight
    assert all(t["boxes"].shape == (len(t["labels"]), 4) for t in targets)
    assert {int(c) for t in targets for c in t["labels"]} <= {1, 2, 3}


def test_factory_builds_offline(monkeypatch, tmp_path):
    from camgate.model.backends import import_object

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    factory = import_object(detect.ARCH, "arch")
    torch.manual_seed(0)
    model = factory(num_classes=4)
    assert isinstance(model, torchvision.models.detection.FCOS)
    assert dict(model.named_modules())[detect.TARGET_LAYER] is model.backbone.body.layer4
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, *synth.DEFAULT_SIZE))
    assert isinstance(out, list) and len(out) == 2
    for o in out:
        assert set(o) == {"boxes", "labels", "scores"}
        n = len(o["scores"])
        assert n <= 10 and o["boxes"].shape == (n, 4) and o["labels"].dtype == torch.int64
        assert o["boxes"].dtype == torch.float32 and (o["scores"] >= 0.05).all()


def test_body_from_the_classifier():
    cls = torchvision.models.resnet18(weights=None, num_classes=4)
    with torch.no_grad():
        cls.bn1.running_mean.uniform_()
    model = detect.fcos_resnet18()
    detect.init_from_classifier(model, cls.state_dict())
    body = model.backbone.body.state_dict()
    for k, v in cls.state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(body[k], v), k
    with pytest.raises(ValueError):
        detect.init_from_classifier(model, {"conv1.weight": cls.conv1.weight})


def test_quality_figures():
    t = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])},
         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1, 1]),
            "scores": torch.tensor([0.9, 0.2])},
           {"boxes": torch.tensor([[5.0, 5.0, 9.0, 9.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.5])}]
    assert detect.match(out, t) == [[0, -1], [-1]]  # each box found once, by the best score
    q = detect.quality(out, t, score_min=0.3)
    assert q["ap50"]["pedestrian"] == 1.0 and q["recall"]["pedestrian"] == 1.0
    assert q["precision_all"] == 0.5 and q["empty_scene_detections"] == 1 and q["ap50"]["bike"] is None


@pytest.mark.slow
def test_tiny_detector_training_writes_loadable_card(tmp_path):
    cfg = detect.DetConfig(n_train=8, n_test=4, epochs=1, batch_size=4, init="none", trainable_layers=5)
    lines = []
    card_path = detect.train_detector("shortcut", tmp_path, seed=0, config=cfg, log=lines.append)
    assert any("epoch 1/1" in line for line in lines)
    assert card_path.parent.name.startswith("underpass-det-shortcut-")
    card = yaml.safe_load(card_path.read_text())
    assert card == {"name": "underpass-det-shortcut", "task": "detection", "arch": "camgate.demo.detect:fcos_resnet18",
                    "num_classes": 4, "classes": ["background", "pedestrian", "bike", "dog"],
                    "weights": "model.safetensors",
                    "input": {"size": [128, 160], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "stretch"},
                    "target_layer": "backbone.body.layer4"}
    model = detect.load_detector(card_path)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 160))
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    metrics = json.loads((card_path.parent / "metrics.json").read_text())
    test_csv = (card_path.parent / metrics["data"]).resolve()
    assert test_csv.is_file() and "boxes" in csv_rows(test_csv)[0]
    assert metrics["threads"] == torch.get_num_threads() and metrics["train_seconds"] > 0
    print("tiny detector:", json.dumps(metrics["test"]))
    # cached: same parameters -> same card, not retrained
    mtime = (card_path.parent / "model.safetensors").stat().st_mtime_ns
    assert detect.train_detector("shortcut", tmp_path, seed=0, config=cfg) == card_path
    assert (card_path.parent / "model.safetensors").stat().st_mtime_ns == mtime
