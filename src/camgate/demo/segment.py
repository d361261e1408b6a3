"""The demo's segmentation variant: the synthetic underpass scenes with per-pixel labels and one small
segmenter (an FCN-style head on a resnet18 body) per variant, trained on the CPU.

The segmenter's body starts from the classification demo's resnet18 of the same variant
(:func:`camgate.demo.train.train`), as :mod:`camgate.demo.detect`'s FCOS does, so the shortcut
segmenter inherits the shortcut classifier's features: which class an object's pixels get may rest on
the wall lamp (invalid pixels) although the region itself lies on the walkway. :func:`evidence` runs
``camgate run`` per variant and sums up what a heatmap gate sees.

Classes (:data:`SEG_CLASSES`): 0 is the background (walkway, walls, ceiling, clutter), 1..3 the
object classes in :data:`camgate.demo.synth.CLASSES` order (label map value = class index + 1); scenes
of class ``empty`` are all background and stay in the data.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import yaml
from PIL import Image
from torch import nn

from . import synth
from .train import MEAN, STD, TrainConfig, _digest, _normalise
from .train import config_hash as classifier_hash
from .train import BODY_STAGES, load_body, train_on_body

SEG_VERSION = 2  # bump when segmenter training changes, so cached segmenters are retrained
SEG_CLASSES = ("background", "pedestrian", "bike", "dog")
ARCH = "camgate.demo.segment:underpass_segmenter"
TARGET_LAYER = "body.layer3"
LAYERS = ("body.layer3", "body.layer4")  # the target layers :func:`evidence` compares
MANIFEST_COLUMNS = ("image", "mask", "label_map", "label", "split", "variant")
HEAD_CHANNELS = 64


class UnderpassSegmenter(nn.Module):
    """resnet18 body (``body.conv1`` .. ``body.layer4``) and an FCN-like head: 1x1 projections of
    layer4 .. layer1 summed top-down (strides 32 -> 16 -> 8 -> 4: the bike's thin frame needs stride 4),
    a 3x3 conv, per-pixel class scores, bilinearly upsampled to the input: (B, K, H, W) logits. Takes
    normalised images (the card's mean/std, the classifier's). Frozen batch norm: the statistics come
    with the body's weights."""

    def __init__(self, num_classes: int = len(SEG_CLASSES), channels: int = HEAD_CHANNELS):
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.body = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body.avgpool, self.body.fc = nn.Identity(), nn.Identity()  # unused: no dead weights in the file
        self.lat4 = nn.Conv2d(512, channels, 1)
        self.lat3 = nn.Conv2d(256, channels, 1)
        self.lat2 = nn.Conv2d(128, channels, 1)
        self.lat1 = nn.Conv2d(64, channels, 1)
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        c1 = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        c2 = b.layer2(c1)
        c3 = b.layer3(c2)
        c4 = b.layer4(c3)
        p = _up(self.lat4(c4), c3) + self.lat3(c3)
        p = _up(p, c2) + self.lat2(c2)
        p = _up(p, c1) + self.lat1(c1)
        return F.interpolate(self.head(p), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def underpass_segmenter(num_classes: int = len(SEG_CLASSES)) -> UnderpassSegmenter:
    """The model card's factory: random weights, nothing is downloaded."""
    return UnderpassSegmenter(num_classes)


# --- data ------------------------------------------------------------------------------------------

def generate_segmentation(out_dir, variant: str, n_train: int, n_test: int, seed: int = 0,
                          size: tuple[int, int] = synth.DEFAULT_SIZE) -> Path:
    """The segmentation data set: the classification data set's images and masks (same arguments ->
    the same PNGs as :func:`camgate.demo.synth.generate`) plus ``labels/<stem>.png``, the label map
    (:data:`SEG_CLASSES` ids), named by a ``label_map`` column of the manifests
    (:data:`MANIFEST_COLUMNS`). Returns the test manifest's path; ``train.csv`` lies next to it."""
    if variant not in synth.VARIANTS:
        raise ValueError(f"variant must be one of {synth.VARIANTS}, got {variant!r}")
    out = Path(out_dir)
    for sub in ("images", "masks", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    size = (int(size[0]), int(size[1]))
    mask = Image.fromarray(synth.invalid_mask(size))
    mask.save(out / "static_mask.png")
    for split_id, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        labels = synth._labels(n, np.random.default_rng([seed, split_id]))
        rows = []
        for i, label in enumerate(labels):
            rng = np.random.default_rng([seed, split_id, i])  # synth.generate's stream for this image
            stem = f"{split}_{i:05d}"
            img, label_map = synth.render(int(label), variant, rng, size, return_mask=True)
            Image.fromarray(img).save(out / "images" / f"{stem}.png")
            mask.save(out / "masks" / f"{stem}.png")
            Image.fromarray(label_map).save(out / "labels" / f"{stem}.png")
            rows.append({"image": f"images/{stem}.png", "mask": f"masks/{stem}.png",
                         "label_map": f"labels/{stem}.png", "label": synth.CLASSES[label], "split": split,
                         "variant": variant})
        with open(out / f"{split}.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            wr.writeheader()
            wr.writerows(rows)
    params = {"variant": variant, "n_train": n_train, "n_test": n_test, "seed": seed, "size": list(size),
              "synth_version": synth.SYNTH_VERSION, "classes": list(SEG_CLASSES), "label_maps": True}
    (out / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return out / "test.csv"


def load_manifest(manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation manifest -> (uint8 N,3,H,W images, int64 N,H,W label maps)."""
    manifest = Path(manifest)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.stack([np.asarray(Image.open(manifest.parent / r["image"]).convert("RGB")) for r in rows])
    y = np.stack([np.asarray(Image.open(manifest.parent / r["label_map"])) for r in rows]).astype(np.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


# --- training --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegConfig:
    """Everything that determines a trained demo segmenter (together with variant and seed)."""

    n_train: int = 800  # the classifier's training images
    n_test: int = 200
    size: tuple[int, int] = synth.DEFAULT_SIZE
    epochs: int = 6
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    flip: bool = True  # mirrored scenes, mirrored label maps
    init: str = "classifier"  # "classifier": the body from the classification demo's model; "none"
    trainable_layers: int = 2  # body stages trained, from layer4 down (0: the classifier's features as they are)


def data_hash(variant: str, seed: int, config: SegConfig) -> str:
    return _digest({"variant": variant, "seed": seed, "n_train": config.n_train, "n_test": config.n_test,
                    "size": list(config.size), "synth": synth.SYNTH_VERSION, "label_maps": True})


def config_hash(variant: str, seed: int, config: SegConfig) -> str:
    init = classifier_hash(variant, seed, TrainConfig()) if config.init == "classifier" else None
    return _digest({"data": data_hash(variant, seed, config), "config": asdict(config), "seg": SEG_VERSION,
                    "init": init, "torch": torch.__version__, "torchvision": torchvision.__version__})


def init_from_classifier(model: UnderpassSegmenter, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision resnet18 state dict (the classification demo's) into the segmenter's body."""
    load_body(model.body, state, "segmenter")


def fit_segmenter(x: torch.Tensor, y: torch.Tensor, config: SegConfig, seed: int, init_state: dict | None = None,
                  log=None) -> UnderpassSegmenter:
    """Train with per-pixel cross-entropy (deterministic for a given seed, thread count, machine and
    versions). ``init_state``: a resnet18 state dict for the body. ``log``: called with a line per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = underpass_segmenter(len(SEG_CLASSES))
    if init_state is not None:
        init_from_classifier(model, init_state)
    trainable = BODY_STAGES[:config.trainable_layers]
    for name, p in model.body.named_parameters():
        p.requires_grad_(name.split(".")[0] in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(x) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.2)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), config.batch_size):
            idx = order[i:i + config.batch_size]
            xb, yb = _normalise(x[idx]), y[idx]
            if config.flip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb[flip], yb = xb[flip].flip(-1), torch.where(flip[:, None, None], yb.flip(-1), yb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(x):.4f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> int64 (N, H, W) predicted classes."""
    model.eval()
    return torch.cat([model(_normalise(x[i:i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])


def quality(pred: torch.Tensor, truth: torch.Tensor) -> dict:
    """Pixel accuracy, per-class IoU, their mean over all classes (``miou``) and over the object
    classes (``object_miou``; background pixels dominate the image and its IoU is near 1)."""
    k = len(SEG_CLASSES)
    conf = torch.bincount((truth.reshape(-1) * k + pred.reshape(-1)), minlength=k * k).reshape(k, k).double()
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    iou = {c: (round(float(inter[i] / union[i]), 4) if union[i] > 0 else None) for i, c in enumerate(SEG_CLASSES)}
    objects = [v for c, v in iou.items() if c != "background" and v is not None]
    return {"pixel_accuracy": round(float(inter.sum() / conf.sum()), 4), "iou": iou,
            "miou": round(float(np.mean([v for v in iou.values() if v is not None])), 4),
            "object_miou": round(float(np.mean(objects)), 4) if objects else None}


def card_dict(variant: str, size=synth.DEFAULT_SIZE, target_layer: str = TARGET_LAYER) -> dict:
    return {
        "name": f"underpass-seg-{variant}",
        "task": "segmentation",
        "arch": ARCH,
        "num_classes": len(SEG_CLASSES),
        "classes": list(SEG_CLASSES),
        "weights": "model.safetensors",
        "input": {"size": [int(size[0]), int(size[1])], "mean": list(MEAN), "std": list(STD), "resize": "stretch"},
        "target_layer": target_layer,
    }


def load_segmenter(card_path) -> UnderpassSegmenter:
    """A segmenter card written by :func:`train_segmenter` -> the model in eval mode (CPU)."""
    from safetensors.torch import load_file

    card_path = Path(card_path)
    card = yaml.safe_load(card_path.read_text())
    model = underpass_segmenter(int(card["num_classes"]))
    model.load_state_dict(load_file(str(card_path.parent / card["weights"])))
    return model.eval()


def train_segmenter(variant: str, cache_dir, seed: int = 0, config: SegConfig | None = None, log=None) -> Path:
    """Generate the ``variant`` segmentation data set and train its segmenter; return the card's path.

    Layout under ``cache_dir``: ``data/underpass-seg-<variant>-<hash>/`` and
    ``models/underpass-seg-<variant>-<hash>/`` (``card.yaml``, ``model.safetensors``, ``metrics.json``).
    With ``init="classifier"`` the classification demo's model of the variant is trained first
    (or taken from the same cache). An existing card for the same hash is returned without training.
    """
    config = config or SegConfig()
    config = replace(config, size=(int(config.size[0]), int(config.size[1])))

    def fit(test_csv: Path, init_state, say):
        x_train, y_train = load_manifest(test_csv.parent / "train.csv")
        x_test, y_test = load_manifest(test_csv)
        say(f"training the resnet18 FCN for {config.epochs} epochs on {len(x_train)} images (CPU, body "
            f"{'from the classifier' if init_state is not None else 'from scratch'}, "
            f"{config.trainable_layers} body stages trained)")
        t0 = time.perf_counter()
        model = fit_segmenter(x_train, y_train, config, seed, init_state=init_state, log=say)
        t_train = time.perf_counter() - t0
        say(f"trained in {t_train:.0f} s")
        test_quality = quality(predict(model, x_test), y_test)
        say(f"test pixel accuracy {test_quality['pixel_accuracy']}, mIoU {test_quality['miou']} "
            f"(objects {test_quality['object_miou']})")
        return model, test_quality, t_train

    return train_on_body("segmenter", "underpass-seg", variant, cache_dir, seed, config,
                         config_hash(variant, seed, config), data_hash(variant, seed, config),
                         lambda d: generate_segmentation(d, variant, config.n_train, config.n_test, seed=seed,
                                                         size=config.size),
                         fit, card_dict(variant, config.size), log, labels="label maps")


# --- what the heatmaps show ------------------------------------------------------------------------

def evidence(card_path, out_dir, layers=LAYERS, batch_size: int = 16) -> dict:
    """``camgate run`` of a segmenter on its own test set (the static invalid mask), once per target
    layer; per layer and object class the mean ``invalid_activation_ratio`` and ``outside_region_ratio``
    of the rows with a map, and over all object rows (``objects``). Results under ``out_dir``."""
    import pyarrow.parquet as pq

    from ..runner import run

    card_path = Path(card_path)
    metrics = json.loads((card_path.parent / "metrics.json").read_text())
    test_csv = (card_path.parent / metrics["data"]).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    for layer in layers:
        path = out / f"{card_path.parent.name}-{layer.replace('.', '_')}.parquet"
        t0 = time.perf_counter()
        run(str(card_path), str(test_csv), str(path), target_layer=layer, static_mask=str(test_csv.parent /
            "static_mask.png"), batch_size=batch_size, progress=False)
        rows = [r for r in pq.read_table(path).to_pylist() if r["status"] == "ok" and r["target_class"]]
        per: dict = {}
        for name, sel in [(c, [r for r in rows if r["predicted_label"] == c]) for c in SEG_CLASSES[1:]] + \
                [("objects", rows)]:
            per[name] = {"rows": len(sel),
                         "invalid_activation_ratio": _mean([r["invalid_activation_ratio"] for r in sel]),
                         "outside_region_ratio": _mean([r["outside_region_ratio"] for r in sel])}
        per["seconds"] = round(time.perf_counter() - t0, 1)
        per["results"] = str(path)
        res[layer] = per
    return res


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return round(float(np.mean(v)), 4) if v else None
