"""Synthetic underpass data (determinism, geometry, manifests) and a tiny demo training run."""
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from camgate.demo import synth
from camgate.demo.train import TrainConfig, train


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def shortcut_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shortcut")
    return synth.generate(out, "shortcut", n_train=12, n_test=8, seed=3)


def test_same_seed_same_bytes(tmp_path, shortcut_set):
    again = synth.generate(tmp_path / "again", "shortcut", n_train=12, n_test=8, seed=3)
    assert _files(shortcut_set.parent) == _files(again.parent)
    other = synth.generate(tmp_path / "other", "shortcut", n_train=12, n_test=8, seed=4)
    assert (other.parent / "images/train_00000.png").read_bytes() != \
        (shortcut_set.parent / "images/train_00000.png").read_bytes()


def test_manifests(shortcut_set):
    root = shortcut_set.parent
    assert shortcut_set.name == "test.csv" and (root / "train.csv").exists()
    for split, n in (("train", 12), ("test", 8)):
        with open(root / f"{split}.csv", newline="") as f:
            assert next(csv.reader(f)) == ["image", "mask", "label", "split", "variant"]
        rows = _rows(root / f"{split}.csv")
        assert len(rows) == n
        for r in rows:
            assert not Path(r["image"]).is_absolute() and ".." not in r["image"]
            assert (root / r["image"]).is_file() and (root / r["mask"]).is_file()
            assert Path(r["image"]).stem == Path(r["mask"]).stem
            assert r["split"] == split and r["variant"] == "shortcut" and r["label"] in synth.CLASSES
        # balanced: every class the same number of times (n is a multiple of 4)
        assert Counter(r["label"] for r in rows) == {c: n // 4 for c in synth.CLASSES}


def test_masks_match_geometry(shortcut_set):
    root = shortcut_set.parent
    expected = synth.invalid_mask(synth.DEFAULT_SIZE)
    h, w = synth.DEFAULT_SIZE
    assert 0.4 < (expected > 0).mean() < 0.65  # walls + ceiling: a sizeable but not dominant share
    assert expected[h - 1, w // 2] == 0 and expected[0, 0] > 0 and expected[h // 2, 0] > 0  # floor / ceiling / wall
    rows = _rows(root / "train.csv") + _rows(root / "test.csv")
    for r in rows:
        m = np.asarray(Image.open(root / r["mask"]))
        img = Image.open(root / r["image"])
        assert img.mode == "RGB" and img.size == (w, h) and m.shape == (h, w)
        np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(np.asarray(Image.open(root / "static_mask.png")), expected)


def test_variants_differ_only_in_invalid_region():
    invalid = synth.invalid_mask() > 0
    for label in range(len(synth.CLASSES)):
        a = synth.render(label, "clean", np.random.default_rng([7, label]))
        b = synth.render(label, "shortcut", np.random.default_rng([7, label]))
        np.testing.assert_array_equal(a[~invalid], b[~invalid])


def test_object_lies_on_the_floor():
    invalid = synth.invalid_mask() > 0
    rng = np.random.default_rng(11)
    for label in range(3):  # same scene with and without the object: it differs on the floor only
        seed = int(rng.integers(1 << 30))
        with_obj = synth.render(label, "clean", np.random.default_rng(seed)).astype(int)
        empty = synth.render(3, "clean", np.random.default_rng(seed)).astype(int)
        diff = np.abs(with_obj - empty).sum(-1) > 0
        assert diff[~invalid].sum() > 50 and not diff[invalid].any()


def test_bad_variant(tmp_path):
    with pytest.raises(ValueError):
        synth.generate(tmp_path, "nope", 4, 4)


def test_tiny_training_writes_loadable_card(tmp_path):
    from safetensors.torch import load_file
    from torchvision.models import get_model

    cfg = TrainConfig(n_train=8, n_test=4, epochs=1, batch_size=4)
    card_path = train("clean", tmp_path, seed=0, config=cfg)
    card = yaml.safe_load(card_path.read_text())
    assert card["arch"] == "torchvision/resnet18" and card["num_classes"] == 4
    assert card["classes"] == list(synth.CLASSES) and card["target_layer"] == "layer3"
    assert card["input"]["size"] == list(synth.DEFAULT_SIZE) and card["input"]["resize"] == "stretch"
    model = get_model(card["arch"].split("/", 1)[1], weights=None, num_classes=card["num_classes"])
    model.load_state_dict(load_file(str(card_path.parent / card["weights"])))
    h, w = card["input"]["size"]
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, h, w)).shape == (1, 4)
    metrics = json.loads((card_path.parent / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (card_path.parent / metrics["data"]).resolve().is_file()
    # deterministic: the same seed elsewhere gives the same weights
    again = train("clean", tmp_path / "again", seed=0, config=cfg)
    assert (again.parent / "model.safetensors").read_bytes() == (card_path.parent / "model.safetensors").read_bytes()
    # cached: same parameters -> same card, not retrained
    mtime = (card_path.parent / "model.safetensors").stat().st_mtime_ns
    assert train("clean", tmp_path, seed=0, config=cfg) == card_path
    assert (card_path.parent / "model.safetensors").stat().st_mtime_ns == mtime
