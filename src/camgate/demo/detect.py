"""The demo's detection variant: the synthetic underpass scenes with ground-truth boxes and one small
FCOS detector (resnet18-FPN) per variant, trained on the CPU.

The detector's backbone body starts from the classification demo's resnet18 of the same variant
(:func:`camgate.demo.train.train`), so the shortcut detector inherits the shortcut classifier's
features: its class evidence for an object may rest on the wall lamp (invalid pixels) while its box
sits on the walkway, which a per-detection heatmap gate is meant to catch.

Classes follow torchvision's detection convention: index 0 is the background and is never predicted
(:data:`DET_CLASSES`); scenes of class ``empty`` carry no box and stay in the data.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image

from ..data.boxes import GtBox
from ..data.boxes import match as match_boxes
from . import synth
from .train import MEAN, STD, TrainConfig, _digest
from .train import config_hash as classifier_hash
from .train import BODY_STAGES, load_body, train_on_body

DET_VERSION = 1  # bump when detector training changes, so cached detectors are retrained
DET_CLASSES = ("background", "pedestrian", "bike", "dog")
ARCH = "camgate.demo.detect:fcos_resnet18"
TARGET_LAYER = "backbone.body.layer4"
IOU_MATCH = 0.5
SCORE_MIN = 0.3  # detections at least this confident count for precision / recall
FPN_CHANNELS = 128


def fcos_resnet18(num_classes: int = len(DET_CLASSES), fpn_channels: int = FPN_CHANNELS,
                  **kwargs) -> torchvision.models.detection.FCOS:
    """FCOS with a resnet18-FPN backbone (P3-P5 from layer2-4, P6/P7 on top), built offline (random
    weights; nothing is downloaded). Takes images in [0, 1] of the demo size (128 x 160, used as is:
    no internal resize) and normalises them with the classification demo's statistics.

    Frozen batch norm, as torchvision's detectors: the statistics come with the weights. The FPN and
    the head run at ``fpn_channels`` (128, half of torchvision's 256: the head dominates the cost
    and a quarter of it trains 2.5x faster on the CPU). ``kwargs`` go to
    :class:`~torchvision.models.detection.FCOS` (defaults: a low score threshold, 0.05, that keeps
    weak detections to explain, and at most 10 detections per image)."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(body, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=[128, 256, 512], out_channels=fpn_channels,
                               extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    h, w = synth.DEFAULT_SIZE
    options = dict(min_size=h, max_size=w, image_mean=list(MEAN), image_std=list(STD), score_thresh=0.05,
                   detections_per_img=10)
    options.update(kwargs)
    if "head" not in options:
        options["head"] = FCOSHead(fpn_channels, 1, num_classes)  # one anchor (location) per cell
    return torchvision.models.detection.FCOS(backbone, num_classes=num_classes, **options)


def generate_detection(out_dir, variant: str, n_train: int, n_test: int, seed: int = 0,
                       size: tuple[int, int] = synth.DEFAULT_SIZE) -> Path:
    """The detection data set: the classification data set's images (same arguments -> the same
    PNGs) with manifests that also carry the boxes (``synth.DETECTION_COLUMNS``). Returns the test
    manifest's path; ``train.csv`` lies next to it."""
    return synth.generate(out_dir, variant, n_train, n_test, seed=seed, size=size, boxes=True)


@dataclass(frozen=True)
class DetConfig:
    """Everything that determines a trained demo detector (together with variant and seed)."""

    n_train: int = 400
    n_test: int = 200
    size: tuple[int, int] = synth.DEFAULT_SIZE
    epochs: int = 5  # 250 steps: ~85 s per variant on 2 CPU threads
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    flip: bool = True  # mirrored scenes, mirrored boxes
    init: str = "classifier"  # "classifier": backbone body from the classification demo's model; "none"
    # Body stages trained, from layer4 down (0: the classifier's features as they are). Fine-tuning
    # layer3-4 lets the clean detector find its classes on the object (frozen, its maps spread onto
    # the walls); the shortcut detector keeps the lamp, the easiest cue in its training data.
    trainable_layers: int = 2


def data_hash(variant: str, seed: int, config: DetConfig) -> str:
    return _digest({"variant": variant, "seed": seed, "n_train": config.n_train, "n_test": config.n_test,
                    "size": list(config.size), "synth": synth.SYNTH_VERSION, "boxes": True})


def config_hash(variant: str, seed: int, config: DetConfig) -> str:
    init = classifier_hash(variant, seed, TrainConfig()) if config.init == "classifier" else None
    return _digest({"data": data_hash(variant, seed, config), "config": asdict(config), "det": DET_VERSION,
                    "init": init, "torch": torch.__version__, "torchvision": torchvision.__version__})


def load_manifest(manifest) -> tuple[torch.Tensor, list[dict]]:
    """Detection manifest -> (uint8 N,3,H,W images, per image a target dict ``boxes`` (n, 4) float32,
    ``labels`` (n,) int64 in :data:`DET_CLASSES` numbering)."""
    manifest = Path(manifest)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.stack([np.asarray(Image.open(manifest.parent / r["image"]).convert("RGB")) for r in rows])
    targets = []
    for r in rows:
        objs = json.loads(r["boxes"])
        targets.append({"boxes": torch.tensor([o["box"] for o in objs], dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([DET_CLASSES.index(o["label"]) for o in objs], dtype=torch.int64)})
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), targets


def _flip(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def init_from_classifier(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision resnet18 state dict (the classification demo's) into the detector's body."""
    load_body(model.backbone.body, state, "detector")


def fit_detector(x: torch.Tensor, targets: list[dict], config: DetConfig, seed: int,
                 init_state: dict | None = None, log=None) -> torch.nn.Module:
    """Train the detector (deterministic for a given seed, thread count, machine and versions).
    ``init_state``: a resnet18 state dict for the body. ``log``: called with a line per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = fcos_resnet18(num_classes=len(DET_CLASSES))
    if init_state is not None:
        init_from_classifier(model, init_state)
    trainable = BODY_STAGES[:config.trainable_layers]
    for name, p in model.backbone.body.named_parameters():
        p.requires_grad_(name.split(".")[0] in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(x) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.2)
    width = x.shape[-1]
    model.train()
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        totals: dict[str, float] = {}
        for i in range(0, len(x), config.batch_size):
            idx = order[i:i + config.batch_size].tolist()
            flip = (torch.rand(len(idx), generator=gen) < 0.5).tolist() if config.flip else [False] * len(idx)
            images, tgts = [], []
            for j, f in zip(idx, flip):
                img = x[j].float() / 255.0
                boxes = targets[j]["boxes"]
                images.append(img.flip(-1) if f else img)
                tgts.append({"boxes": _flip(boxes, width) if f else boxes, "labels": targets[j]["labels"]})
            losses = model(images, tgts)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.detach().item() * len(idx)
        if log:
            parts = ", ".join(f"{k} {v / len(x):.3f}" for k, v in totals.items())
            log(f"epoch {epoch + 1}/{config.epochs}: loss {sum(totals.values()) / len(x):.3f} ({parts}) "
                f"({time.perf_counter() - t0:.0f} s)")
    return model.eval()


@torch.no_grad()
def detect(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 16) -> list[dict]:
    """uint8 (N, 3, H, W) images -> the detector's outputs, one dict per image (eval mode)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out += model(list(x[i:i + batch_size].float() / 255.0))
    return out


def _average_precision(scores: list[float], hits: list[bool], n_gt: int) -> float | None:
    """All-point interpolated AP (PASCAL VOC 2010+) of detections given as (score, true positive)."""
    if n_gt == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(hits, dtype=np.float64)[order]
    if not len(tp):
        return 0.0
    recall = np.cumsum(tp) / n_gt
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    r = np.concatenate([[0.0], recall])
    return float(np.sum((r[1:] - r[:-1]) * precision))


def match(outputs: list[dict], targets: list[dict], iou: float = IOU_MATCH) -> list[list[int]]:
    """Per image and detection: the index of the ground-truth box it finds (COCO's greedy matching of
    :func:`camgate.data.boxes.match`: by score, IoU >= ``iou``, same label), -1 for a false positive."""
    found = []
    for out, tgt in zip(outputs, targets):
        gt = [GtBox(tuple(b.tolist()), int(lab)) for b, lab in zip(tgt["boxes"], tgt["labels"])]
        hit = [-1] * len(out["scores"])
        for g, d, _ in match_boxes(out["boxes"], out["labels"], out["scores"], gt, iou):
            if d is not None:
                hit[d] = g
        found.append(hit)
    return found


def quality(outputs: list[dict], targets: list[dict], score_min: float = SCORE_MIN) -> dict:
    """Detection quality at IoU 0.5: AP50 per class and its mean over the object classes, and at
    score >= ``score_min`` recall, precision and false positives on scenes without an object."""
    hits = match(outputs, targets)
    res: dict = {"ap50": {}, "recall": {}, "precision": {}}
    for c in range(1, len(DET_CLASSES)):
        name = DET_CLASSES[c]
        n_gt = sum(int((t["labels"] == c).sum()) for t in targets)
        scores, tp = [], []
        for out, hit in zip(outputs, hits):
            for d in range(len(out["scores"])):
                if int(out["labels"][d]) == c:
                    scores.append(float(out["scores"][d]))
                    tp.append(hit[d] >= 0)
        res["ap50"][name] = None if n_gt == 0 else round(_average_precision(scores, tp, n_gt), 4)
        kept = [h for s, h in zip(scores, tp) if s >= score_min]
        res["recall"][name] = round(sum(kept) / n_gt, 4) if n_gt else None
        res["precision"][name] = round(sum(kept) / len(kept), 4) if kept else None
    aps = [v for v in res["ap50"].values() if v is not None]
    res["map50"] = round(float(np.mean(aps)), 4) if aps else None
    n_gt = sum(len(t["labels"]) for t in targets)
    kept = [h >= 0 for out, hit in zip(outputs, hits) for s, h in zip(out["scores"].tolist(), hit) if s >= score_min]
    res["recall_all"] = round(sum(kept) / n_gt, 4) if n_gt else None
    res["precision_all"] = round(sum(kept) / len(kept), 4) if kept else None
    res["empty_scene_detections"] = sum(int((out["scores"] >= score_min).sum())
                                        for out, t in zip(outputs, targets) if len(t["labels"]) == 0)
    res["score_min"] = score_min
    return res


def card_dict(variant: str, size=synth.DEFAULT_SIZE) -> dict:
    return {
        "name": f"underpass-det-{variant}",
        "task": "detection",
        "arch": ARCH,
        "num_classes": len(DET_CLASSES),
        "classes": list(DET_CLASSES),
        "weights": "model.safetensors",
        # the detector takes images in [0, 1] and normalises them itself
        "input": {"size": [int(size[0]), int(size[1])], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "stretch"},
        "target_layer": TARGET_LAYER,
    }


def load_detector(card_path) -> torch.nn.Module:
    """A detector card written by :func:`train_detector` -> the model in eval mode (CPU)."""
    from safetensors.torch import load_file

    card_path = Path(card_path)
    card = yaml.safe_load(card_path.read_text())
    model = fcos_resnet18(num_classes=int(card["num_classes"]))
    model.load_state_dict(load_file(str(card_path.parent / card["weights"])))
    return model.eval()


def train_detector(variant: str, cache_dir, seed: int = 0, config: DetConfig | None = None, log=None) -> Path:
    """Generate the ``variant`` detection data set and train its detector; return the card's path.

    Layout under ``cache_dir``: ``data/underpass-det-<variant>-<hash>/`` and
    ``models/underpass-det-<variant>-<hash>/`` (``card.yaml``, ``model.safetensors``, ``metrics.json``).
    With ``init="classifier"`` the classification demo's model of the variant is trained first
    (or taken from the same cache). An existing card for the same hash is returned without training.
    """
    config = config or DetConfig()
    config = replace(config, size=(int(config.size[0]), int(config.size[1])))

    def fit(test_csv: Path, init_state, say):
        x_train, t_train_targets = load_manifest(test_csv.parent / "train.csv")
        x_test, t_test_targets = load_manifest(test_csv)
        say(f"training fcos_resnet18 for {config.epochs} epochs on {len(x_train)} images (CPU, body "
            f"{'from the classifier' if init_state is not None else 'from scratch'}, "
            f"{config.trainable_layers} body stages trained)")
        t0 = time.perf_counter()
        model = fit_detector(x_train, t_train_targets, config, seed, init_state=init_state, log=say)
        t_train = time.perf_counter() - t0
        test_quality = quality(detect(model, x_test), t_test_targets)
        say(f"test mAP50 {test_quality['map50']}, recall {test_quality['recall_all']}, precision "
            f"{test_quality['precision_all']} (score >= {SCORE_MIN})")
        return model, test_quality, t_train

    return train_on_body("detector", "underpass-det", variant, cache_dir, seed, config,
                         config_hash(variant, seed, config), data_hash(variant, seed, config),
                         lambda d: generate_detection(d, variant, config.n_train, config.n_test, seed=seed,
                                                      size=config.size),
                         fit, card_dict(variant, config.size), log, labels="boxes")
