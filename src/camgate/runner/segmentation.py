"""The heatmap test step for semantic segmentation models (model card ``task: segmentation``) and
multi-label classifiers (``task: multilabel``): one row per (image, explained class), in
:func:`camgate.runner.run`'s loop and files.

What is explained, per image:

- segmentation: each class present in the prediction (argmax over the classes, at least one pixel),
  or the classes the ``classes`` setting names; a class's region is its predicted pixels. A named class
  without a predicted pixel is a ``no_region`` row (no map); an image with no class at all keeps one
  ``no_region`` row saying why. With ground truth (the manifest's ``regions`` column: a label map of the
  image's size, pixel = class id, 255 = void) the classes present in it instead, each on its labelled
  pixels: the label map is cut like the image (``InputSpec.box``) and resized nearest-neighbour to the
  model output's resolution. A label map that cannot be read, of another size than its image, or with a
  class the model does not have is that image's error row;
- multi-label: each label whose sigmoid probability is at least ``score_threshold``, or the labels
  ``classes`` names, or (``target='label'``) the labels the manifest's ``label`` column gives
  (``;``-separated ids or class names); an image without a positive (or given) label keeps one
  ``no_label`` row saying why; a label the model does not have is the image's error row.

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

import numpy as np
import torch

from ..cam import BLACKBOX, MethodError, canonical
from ..cam.blackbox import check_budget
from ..cam.segmentation import (NO_REGION, MultiLabelCamEngine, SegmentationCamEngine, check_class_ids,
                                multilabel_blackbox, segmentation_blackbox)
from ..data import device as gpu
from ..data.decode import VOID, Sample, decode_label_map, model_view, storage_error_kind
from ..data.manifest import label_index
from ..errors import ConfigError
from ..io import results as res
from ..io import storage
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


def manifest_labels(value, card) -> list[int]:
    """A multi-label item's ``label`` cell (``;``-separated ids or class names; None = no label) -> ids,
    in the order given; ValueError naming a label the model does not have."""
    if value is None:
        return []
    parts = [value] if isinstance(value, int) else str(value).split(";")
    ids = [label_index(p.strip(), card.classes, card.num_classes) for p in map(str, parts) if p.strip()]
    return list(dict.fromkeys(ids))


class _BlackBox:
    """What ``run`` needs of an engine (``method``, ``close``) for RISE / DE-CAM on these tasks."""

    def __init__(self, fn, backend, method: str, budget: int, seed: int, **kw):
        self.fn, self.backend, self.method, self.budget, self.seed, self.kw = fn, backend, method, budget, seed, kw

    def __call__(self, x: torch.Tensor, classes, rows: list[int], **given):
        return self.fn(self.backend, x, self.method, classes, budget=self.budget,
                       seeds=[row_seed(self.seed, r) for r in rows], **given, **self.kw)

    def close(self):
        pass


class _ClassRunner(Runner):
    """:class:`Runner` for per-class rows: ``process`` turns a batch into rows, one or more per image."""

    task = "?"
    empty = "?"  # the status of an image with nothing to explain
    targets = ("predicted",)  # what ``target`` may be
    row_target = "predicted"  # rows come from the model's output (or the manifest), not from triage

    def __init__(self, lm: LoadedModel, method: str = default("method"), analyze: bool = True,
                 topk: float = default("topk"), meta_types: dict | None = None, budget: int = default("budget"),
                 seed: int = default("seed"), amp: str = default("amp"), classes: str | list | None = None,
                 score_threshold: float = default("score_threshold"), max_batch: int = 1 << 30,
                 target: str = "predicted"):
        from ..model.backends import TorchBackend

        self._setup(lm, analyze, topk, meta_types, amp, max_batch)
        if str(method).lower() == "drise":
            raise MethodError(f"drise explains object detectors; model card {lm.card.name!r} is task {self.task}: "
                              f"use decam or rise")
        name = canonical(method)
        self.classes = parse_classes(classes, lm.card)
        self.score_threshold = check_score_threshold(score_threshold)
        self.target = str(target if target is not None else "predicted")
        if self.target not in self.targets:
            raise ConfigError(f"target {target!r} does not apply to {self.what} (model card {lm.card.name!r}): "
                              f"{self.explained}")
        if self.target == "label" and self.classes is not None:
            raise ConfigError("classes and target 'label' both choose the labels to explain: give one of them")
        self.ground_truth = False  # segmentation: regions from the manifest's label maps (set by run)
        self._given: dict[int, tuple] = {}  # item index -> (classes, region) of the batch in hand
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

    def _inputs(self, s: Sample) -> tuple:
        """An image's (classes to explain or None, given region or None); ValueError / StorageError
        naming the problem, which becomes the image's error row."""
        return self.classes, None

    def _note(self, s: Sample, note: str) -> str:
        """Why an image has nothing to explain."""
        return note or "nothing to explain"

    def _explain(self, x: torch.Tensor, rows: list[int]):
        given = [self._given.get(r, (self.classes, None)) for r in rows]
        classes = None if all(c is None for c, _ in given) else [c for c, _ in given]
        regions = None if all(r is None for _, r in given) else [r for _, r in given]
        kw = {} if regions is None else {"regions": regions}
        return self.engine(x, classes, rows, **kw) if self.black_box else self.engine(x, classes, **kw)

    def process(self, batch: list[Sample]) -> list[dict]:
        self._given = {}
        for s in batch:
            if s.error is None:
                try:
                    self._given[s.item.index] = self._inputs(s)
                except (ValueError, storage.StorageError) as e:  # this image's ground truth: its row says why
                    s.error = f"image {s.item.image} (id {s.item.image_id}): {e}"
                    s.error_kind = storage_error_kind(e)
        return super().process(batch)

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
            row.update(status=self.empty, error=f"{where}: {self._note(s, cm.note)}", error_kind=None)
            if objects:
                row["_objects"] = objects
        apply_metrics(good, good_cams, good_masks, self.topk, regions=good_regions or None)


class SegmentationRunner(_ClassRunner):
    """Rows per (image, class present in the prediction or named); metrics also per class region."""

    task, empty = "segmentation", NO_REGION
    what, explained = "a segmentation model", "its classes are explained (--classes, or a regions column)"

    def _inputs(self, s: Sample) -> tuple:
        if not self.ground_truth:
            return self.classes, None
        uri = s.item.regions
        if uri is None:
            raise ValueError("no ground-truth label map (its regions cell is empty, other images have one)")
        try:
            labels = decode_label_map(storage.read_bytes(uri), s.size)
        except ValueError as e:
            raise ValueError(f"ground-truth label map {uri}: {e}") from None
        k = self.lm.card.num_classes
        bad = sorted(set(np.unique(labels).tolist()) - set(range(k)) - {VOID})
        if bad:
            names = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"ground-truth label map {uri}: class {names} is not a class of the model "
                             f"(0 to {k - 1}; {VOID} = void)")
        # the part of the image the model sees; the engine resizes it to the output's resolution
        return self.classes, torch.from_numpy(model_view(labels, self.lm.input, s.size))

    def _note(self, s: Sample, note: str) -> str:
        note = super()._note(s, note)
        return f"ground truth {s.item.regions}: {note}" if self.ground_truth else note

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
    targets = ("predicted", "label")
    what = "a multi-label model"
    explained = ("its positive labels are explained (--score-threshold, --classes), or the manifest's "
                 "(--target label)")

    def _inputs(self, s: Sample) -> tuple:
        if self.target != "label":
            return self.classes, None
        return manifest_labels(s.item.label, self.lm.card), None

    def _note(self, s: Sample, note: str) -> str:
        if self.target == "label" and not note:
            return "no label in the manifest's label column"
        return super()._note(s, note)

    def _engine(self, lm: LoadedModel, name: str):
        if not 0 < self.score_threshold < 1:
            raise ConfigError(f"score_threshold must be in (0, 1) for a multi-label model, got {self.score_threshold}")
        return MultiLabelCamEngine(lm.model, lm.layers(), name, lm.reshape_transform, lm.card.num_classes,
                                   threshold=self.score_threshold)

    def _black_box(self, backend, name: str, budget: int, seed: int):
        th = self.score_threshold
        return _BlackBox(lambda b, x, m, labels, **kw: multilabel_blackbox(b, x, m, labels, threshold=th, **kw),
                         backend, name, budget, seed)
