"""The heatmap test step for semantic segmentation models (model card ``task: segmentation``) and
multi-label classifiers (``task: multilabel``): one row per (image, explained class), in
:func:`camgate.runner.run`'s loop and files.

What is explained, per image:

- segmentation: each class present in the prediction (argmax over the classes, at least one pixel),
  or the classes the ``classes`` setting names; a class's region is its predicted pixels. A named class
  without a predicted pixel is a ``no_region`` row (no map); an image with no class at all keeps one
  ``no_region`` row saying why;
- multi-label: each label whose sigmoid probability is at least ``score_threshold``, or the labels
  ``classes`` names; an image without a positive label keeps one ``no_label`` row saying why.

``target_class`` and ``predicted_class`` hold the class explained (so per-class gate scopes group by
it), ``predicted_score`` its mean softmax probability over its region (segmentation) or its sigmoid
probability (multi-label). Gradient methods go through :mod:`camgate.cam.segmentation`'s engines (one
forward per batch, one backward per class rank); ``decam``/``rise`` (and black-box cards) through its
black-box functions, ``budget`` passes per image seeded from ``seed`` and the image's ``row``.

Segmentation rows also store the region (``region``: the bool mask at the model output's resolution,
row-major, bit-packed with ``numpy.packbits``; ``region_height``, ``region_width``, ``region_pixels``),
so that ``analyze`` computes ``outside_region_ratio`` and ``region_invalid_area`` from a heatmaps file
exactly as ``run`` does (:func:`camgate.runner.common.apply_metrics`).
"""
from __future__ import annotations

import math

import torch

from ..cam import BLACKBOX, MethodError, canonical
from ..cam.blackbox import check_budget
from ..cam.segmentation import (NO_REGION, MultiLabelCamEngine, SegmentationCamEngine, check_class_ids,
                                multilabel_blackbox, segmentation_blackbox)
from ..data import device as gpu
from ..data.decode import Sample
from ..errors import ConfigError
from ..io import results as res
from ..io.results import region_bytes
from ..model.load import LoadedModel
from ..settings import default
from .classifier import Runner
from .common import apply_metrics, row_seed
from .detection import check_score_threshold

NO_LABEL = "no_label"


def parse_classes(value, card) -> list[int] | None:
    """The ``classes`` setting (comma-separated ids or class names; '' / None = not given) -> class ids,
    each checked against the model card: a ConfigError naming the class, before any data is read."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = {n: i for i, n in enumerate(card.classes or [])}
    ids = []
    for p in (str(p).strip() for p in parts):
        if not p:
            continue
        if p in names:
            ids.append(names[p])
            continue
        try:
            ids.append(int(p))
        except ValueError:
            known = f"; its classes: {', '.join(card.classes)}" if card.classes else ""
            raise ConfigError(f"class {p!r} is neither a class id nor a class name of model card "
                              f"{card.name!r}{known}") from None
    return check_class_ids(list(dict.fromkeys(ids)), card.num_classes) if ids else None


class _BlackBox:
    """What ``run`` needs of an engine (``method``, ``close``) for RISE / DE-CAM on these tasks."""

    def __init__(self, fn, backend, method: str, budget: int, seed: int, **kw):
        self.fn, self.backend, self.method, self.budget, self.seed, self.kw = fn, backend, method, budget, seed, kw

    def __call__(self, x: torch.Tensor, classes, rows: list[int]):
        return self.fn(self.backend, x, self.method, classes, budget=self.budget,
                       seeds=[row_seed(self.seed, r) for r in rows], **self.kw)

    def close(self):
        pass


class _ClassRunner(Runner):
    """:class:`Runner` for per-class rows: ``process`` turns a batch into rows, one or more per image."""

    task = "?"
    empty = "?"  # the status of an image with nothing to explain

    def __init__(self, lm: LoadedModel, method: str = default("method"), analyze: bool = True,
                 topk: float = default("topk"), meta_types: dict | None = None, budget: int = default("budget"),
                 seed: int = default("seed"), amp: str = default("amp"), classes: str | list | None = None,
                 score_threshold: float = default("score_threshold"), max_batch: int = 1 << 30):
        from ..model.backends import TorchBackend

        self._setup(lm, analyze, topk, meta_types, amp, max_batch)
        self.memory_format = torch.channels_last if (
            lm.model is not None and gpu.channels_last(lm.model, lm.device)) else torch.contiguous_format
        if str(method).lower() == "drise":
            raise MethodError(f"drise explains object detectors; model card {lm.card.name!r} is task {self.task}: "
                              f"use decam or rise")
        name = canonical(method)
        self.classes = parse_classes(classes, lm.card)
        self.score_threshold = check_score_threshold(score_threshold)
        self.target = "predicted"  # the classes themselves are explained
        self.black_box = name in BLACKBOX
        if self.black_box:
            check_budget(budget)
            backend = lm.backend if lm.backend is not None else TorchBackend.from_loaded(lm)
            self.engine = self._black_box(backend, name, int(budget), int(seed))
        elif lm.model is None:
            raise MethodError(f"{name!r} needs the model's gradients or layers, but model card {lm.card.name!r} is "
                              f"kind {lm.card.kind!r}, a black box: use method decam or rise")
        else:
            self.engine = self._engine(lm, name)
        self.layer_name = None if self.black_box else ",".join(lm.target_layers)

    def _explain(self, x: torch.Tensor, rows: list[int]):
        given = None if self.classes is None else [self.classes] * x.shape[0]
        return self.engine(x, given, rows) if self.black_box else self.engine(x, given)

    def process(self, batch: list[Sample]) -> list[dict]:
        out = []
        for row in super().process(batch):
            objects = row.pop("_objects", None)
            out += [{**row, **o} for o in objects] if objects else [row]
        return out

    def probe(self, n: int) -> None:
        x = torch.zeros(n, 3, *self.lm.input.size, device=self.lm.device)
        with gpu.autocast(self.lm.device, self.amp):
            self._explain(x.contiguous(memory_format=self.memory_format), list(range(n)))

    def _object(self, cm, t: int, cams: torch.Tensor) -> dict:
        """Row fields of target t of an image's ClassMaps (besides the map and status)."""
        c = int(cm.classes[t])
        names = self.lm.card.classes
        score = float(cm.scores[t])
        return {"target_class": c, "predicted_class": c, "predicted_label": names[c] if names else None,
                "predicted_score": None if math.isnan(score) else score}

    def _compute(self, samples: list[Sample], rows: list[dict], targets: list[int]) -> None:
        dev = self.lm.device
        x = torch.stack([s.x for s in samples]).to(dev, non_blocking=True).contiguous(memory_format=self.memory_format)
        with gpu.autocast(dev, self.amp):
            maps = self._explain(x, [s.item.index for s in samples])
        good, good_cams, good_masks, good_regions = [], [], [], []
        for s, row, cm in zip(samples, rows, maps):
            where = f"image {s.item.image} (id {s.item.image_id})"
            cams = cm.maps.float()
            finite = torch.isfinite(cams).flatten(1).all(1).tolist() if len(cm) else []
            objects = []
            for t in range(len(cm)):
                o = {"status": "ok", "error": None, "error_kind": None, **self._object(cm, t, cams)}
                if cm.status[t] != "ok":  # a named class with an empty region: no map
                    o.update(status=cm.status[t], error=f"{where}: {cm.reasons[t]}")
                    objects.append(o)
                    continue
                o.update(cam_height=cams.shape[1], cam_width=cams.shape[2], cam=res.cam_bytes(cams[t].cpu()))
                if not finite[t]:
                    o.update(status="error", error_kind="model", cam=None,
                             error=f"{where}: class {o['target_class']}: the heatmap has NaN/Inf")
                elif self.analyze:
                    good.append(o)
                    good_cams.append(cams[t])
                    good_masks.append(s.mask.to(dev, non_blocking=True))
                    if cm.regions is not None:
                        good_regions.append(cm.regions[t])
                objects.append(o)
            row.update(status=self.empty, error=f"{where}: {cm.note or 'nothing to explain'}", error_kind=None)
            if objects:
                row["_objects"] = objects
        apply_metrics(good, good_cams, good_masks, self.topk, regions=good_regions or None)


class SegmentationRunner(_ClassRunner):
    """Rows per (image, class present in the prediction or named); metrics also per class region."""

    task, empty = "segmentation", NO_REGION

    def _engine(self, lm: LoadedModel, name: str):
        return SegmentationCamEngine(lm.model, lm.layers(), name, lm.reshape_transform, lm.card.num_classes)

    def _black_box(self, backend, name: str, budget: int, seed: int):
        return _BlackBox(lambda b, x, m, classes, **kw: segmentation_blackbox(b, x, m, classes, **kw),
                         backend, name, budget, seed)

    def _object(self, cm, t: int, cams: torch.Tensor) -> dict:
        region = cm.regions[t]
        return {**super()._object(cm, t, cams), "region_pixels": int(region.sum()),
                "region_height": int(region.shape[0]), "region_width": int(region.shape[1]),
                "region": region_bytes(region)}


class MultiLabelRunner(_ClassRunner):
    """Rows per (image, positive label at ``score_threshold``, or named label)."""

    task, empty = "multilabel", NO_LABEL

    def _engine(self, lm: LoadedModel, name: str):
        if not 0 < self.score_threshold < 1:
            raise ConfigError(f"score_threshold must be in (0, 1) for a multi-label model, got {self.score_threshold}")
        return MultiLabelCamEngine(lm.model, lm.layers(), name, lm.reshape_transform, lm.card.num_classes,
                                   threshold=self.score_threshold)

    def _black_box(self, backend, name: str, budget: int, seed: int):
        th = self.score_threshold
        return _BlackBox(lambda b, x, m, labels, **kw: multilabel_blackbox(b, x, m, labels, threshold=th, **kw),
                         backend, name, budget, seed)
