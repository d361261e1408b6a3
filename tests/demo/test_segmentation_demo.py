"""The demo's segmentation variant: label maps, manifests, the segmenter factory through camgate's loader,
and (slow) the trained segmenters: the shortcut one's object maps lean on the wall lamp."""
import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import yaml

from helpers import csv_rows, tree_bytes

from camgate.demo import segment, synth

ROOT = Path(__file__).resolve().parents[2]
WORKDIR = ROOT / ".cache" / "demo"  # shared with `make demo`: trained models are reused


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_label_map_is_the_silhouette(seed):
    invalid = synth.invalid_mask() > 0
    for label in range(4):
        for variant in synth.VARIANTS:
            plain_rng, rng = np.random.default_rng([seed, label]), np.random.default_rng([seed, label])
            plain = synth.render(label, variant, plain_rng)
            img, box, lab = synth.render(label, variant, rng, return_box=True, return_mask=True)
            # the keywords change neither the image nor the rng stream
            np.testing.assert_array_equal(img, plain)
            assert rng.random() == plain_rng.random()
            img2, lab2 = synth.render(label, variant, np.random.default_rng([seed, label]), return_mask=True)
            np.testing.assert_array_equal(img2, plain)
            np.testing.assert_array_equal(lab2, lab)
            assert lab.dtype == np.uint8 and lab.shape == synth.DEFAULT_SIZE
            if label == 3:  # empty
                assert box is None and not lab.any()
                continue
            assert set(np.unique(lab)) == {0, label + 1}
            sil = lab > 0
            assert not (sil & invalid).any()  # on the walkway only
            # tight: its bounding box is the detection box
            rows, cols = np.flatnonzero(sil.any(1)), np.flatnonzero(sil.any(0))
            assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == box
    # against the scene without the object (same draws): the object changes every labelled pixel, and
    # every changed pixel above its floor shadow is labelled
    for label in range(3):
        img, box, lab = synth.render(label, "clean", np.random.default_rng([seed, label]), return_box=True,
                                     return_mask=True)
        empty = synth.render(3, "clean", np.random.default_rng([seed, label]))
        diff = np.abs(img.astype(int) - empty.astype(int)).sum(-1) > 0
        assert (diff[lab > 0]).mean() > 0.98
        y1, y2 = int(box[1]), int(box[3])
        body = diff.copy()
        body[y2 - int(0.1 * (y2 - y1)) - 2:] = False
        assert (lab[body] > 0).all()


def test_segmentation_manifests(tmp_path):
    test_csv = segment.generate_segmentation(tmp_path / "a", "shortcut", n_train=8, n_test=8, seed=2)
    root = test_csv.parent
    again = segment.generate_segmentation(tmp_path / "b", "shortcut", n_train=8, n_test=8, seed=2)
    assert tree_bytes(root) == tree_bytes(again.parent)  # deterministic, byte for byte
    plain = synth.generate(tmp_path / "c", "shortcut", n_train=8, n_test=8, seed=2).parent
    for sub in ("images", "masks"):  # the classification data set's images and masks
        assert tree_bytes(plain / sub) == tree_bytes(root / sub)
    assert (root / "static_mask.png").read_bytes() == (plain / "static_mask.png").read_bytes()
    for split in ("train", "test"):
        with open(root / f"{split}.csv", newline="") as f:
            assert tuple(next(csv.reader(f))) == segment.MANIFEST_COLUMNS
        rows = csv_rows(root / f"{split}.csv")
        assert [r["label"] for r in rows] == [r["label"] for r in csv_rows(plain / f"{split}.csv")]
    x, y = segment.load_manifest(test_csv)
    h, w = synth.DEFAULT_SIZE
    assert x.shape == (8, 3, h, w) and x.dtype == torch.uint8 and y.shape == (8, h, w) and y.dtype == torch.int64
    for r, lab in zip(csv_rows(test_csv), y):
        c = synth.CLASSES.index(r["label"])
        assert set(lab.unique().tolist()) == ({0} if r["label"] == "empty" else {0, c + 1})


def test_factory_runs_through_camgate(monkeypatch, tmp_path):
    """The card's factory builds offline, gives (B, K, H, W) logits, and ``camgate run`` takes the card."""
    from safetensors.torch import save_file

    from camgate.model.backends import import_object
    from camgate.runner import run

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = import_object(segment.ARCH, "arch")(num_classes=4)
    names = dict(model.named_modules())
    assert all(layer in names for layer in segment.LAYERS)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, *synth.DEFAULT_SIZE)).shape == (2, 4, *synth.DEFAULT_SIZE)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(segment.card_dict("clean")))
    test_csv = segment.generate_segmentation(tmp_path / "d", "clean", n_train=0, n_test=2, seed=0)
    run(str(tmp_path / "card.yaml"), str(test_csv), str(tmp_path / "r.parquet"), progress=False,
        static_mask=str(test_csv.parent / "static_mask.png"), target_layer="body.layer4")
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert {r["row"] for r in rows} == {0, 1} and all(r["status"] != "error" for r in rows)
    assert all(r["label_map"].startswith("labels/") for r in rows)  # the manifest's columns pass through


def test_body_from_the_classifier():
    cls = torchvision.models.resnet18(weights=None, num_classes=4)
    with torch.no_grad():
        cls.bn1.running_mean.uniform_()
    model = segment.underpass_segmenter()
    segment.init_from_classifier(model, cls.state_dict())
    body = model.body.state_dict()
    for k, v in cls.state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(body[k], v), k
    with pytest.raises(ValueError):
        segment.init_from_classifier(model, {"conv1.weight": cls.conv1.weight})


def test_quality_figures():
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    pred = torch.tensor([[0, 0, 1, 0], [0, 0, 2, 2]])
    q = segment.quality(pred, truth)
    assert q["pixel_accuracy"] == 0.875
    assert q["iou"] == {"background": 0.8, "pedestrian": 0.5, "bike": 1.0, "dog": None}
    assert q["object_miou"] == 0.75 and q["miou"] == round((0.8 + 0.5 + 1.0) / 3, 4)


@pytest.mark.slow
def test_tiny_segmenter_training_writes_loadable_card(tmp_path):
    cfg = segment.SegConfig(n_train=8, n_test=4, epochs=1, batch_size=4, init="none", trainable_layers=5)
    lines = []
    card_path = segment.train_segmenter("shortcut", tmp_path, seed=0, config=cfg, log=lines.append)
    assert any("epoch 1/1" in line for line in lines)
    assert card_path.parent.name.startswith("underpass-seg-shortcut-")
    card = yaml.safe_load(card_path.read_text())
    assert card == {"name": "underpass-seg-shortcut", "task": "segmentation", "arch": segment.ARCH,
                    "num_classes": 4, "classes": ["background", "pedestrian", "bike", "dog"],
                    "weights": "model.safetensors",
                    "input": {"size": [128, 160], "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "stretch"},
                    "target_layer": segment.TARGET_LAYER}
    with torch.no_grad():
        assert segment.load_segmenter(card_path)(torch.rand(2, 3, 128, 160)).shape == (2, 4, 128, 160)
    metrics = json.loads((card_path.parent / "metrics.json").read_text())
    assert (card_path.parent / metrics["data"]).resolve().is_file() and metrics["train_seconds"] > 0
    mtime = (card_path.parent / "model.safetensors").stat().st_mtime_ns
    assert segment.train_segmenter("shortcut", tmp_path, seed=0, config=cfg) == card_path  # cached
    assert (card_path.parent / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_shortcut_segmenter_borrows_lamp_evidence(tmp_path):
    """Both segmenters find the objects; the shortcut one's object maps lie on the wall lamp far more at
    the card's target layer (layer3). Both layers' figures are printed (layer4's 4 x 5 cells do not
    separate the two); only wide margins are asserted."""
    figures = {}
    for variant in synth.VARIANTS:
        card = segment.train_segmenter(variant, WORKDIR / "cache", log=print)
        metrics = json.loads((card.parent / "metrics.json").read_text())
        ev = segment.evidence(card, tmp_path / variant)
        figures[variant] = {"train_seconds": metrics["train_seconds"], "test": metrics["test"], "evidence": ev}
        print(variant, json.dumps(figures[variant]))
        # loose floors: the walkway objects are segmented, not guessed
        assert metrics["test"]["pixel_accuracy"] > 0.9 and metrics["test"]["object_miou"] > 0.3
    # measured (seed 0, 2-core machine): objects 0.71 vs 0.17, pedestrian 0.87 vs 0.11; outside its own
    # region 0.98 vs 0.80 (the object is small beside a 16-pixel cell, so both are high)
    clean, short = (figures[v]["evidence"][segment.TARGET_LAYER] for v in synth.VARIANTS)
    assert clean["objects"]["rows"] > 50 and short["objects"]["rows"] > 50
    assert short["objects"]["invalid_activation_ratio"] > clean["objects"]["invalid_activation_ratio"] + 0.15
    assert short["pedestrian"]["invalid_activation_ratio"] > clean["pedestrian"]["invalid_activation_ratio"] + 0.2
    assert short["objects"]["outside_region_ratio"] > clean["objects"]["outside_region_ratio"] + 0.05
