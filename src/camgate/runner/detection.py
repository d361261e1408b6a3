"""The heatmap test step for object detectors (model card ``task: detection``): one row per
(image, explained detection), in :func:`camgate.runner.run`'s loop and files.

What is explained, per image:

- without ground truth: each detection scoring at least ``score_threshold``;
- with ground truth (the manifest's ``boxes`` column, or a COCO ``annotations`` file): per
  ground-truth box the detection matched to it (COCO's greedy matching: detections above the
  threshold by descending score, IoU >= 0.5, same class); a box nothing matched is a ``missed`` row;
- nothing to explain: one ``no_detection`` row. Every image keeps at least one row.

Gradient methods take each detection's box score (:mod:`camgate.cam.detection`: one forward per batch,
one backward per detection rank); ``drise`` shows the detector masked images only
(:mod:`camgate.cam.drise`; ``budget`` masked passes per image plus one clean pass, seeded per image
from ``seed`` and its ``row``). Boxes come back in original image pixels; the metrics of a map are
those of a classification row plus ``outside_box_ratio`` and ``box_invalid_area``.
"""
from __future__ import annotations

import torch

from ..cam import MethodError, canonical
from ..cam.blackbox import check_budget
from ..cam.detection import DetectionCamEngine
from ..cam.drise import drise_detections
from ..data import device as gpu
from ..data.boxes import GtBox, load_coco, match, parse_boxes
from ..data.decode import Sample
from ..errors import ConfigError
from ..io import results as res
from ..model.load import LoadedModel
from ..settings import default
from .common import apply_metrics, row_seed
from .classifier import Runner

IOU_MATCH = 0.5  # ground truth <-> detection, as COCO's AP50


def check_score_threshold(value: float) -> float:
    v = float(value)
    if not 0 <= v <= 1:
        raise ConfigError(f"score_threshold must be in [0, 1], got {value}")
    return v


class DetectionRunner(Runner):
    """:class:`Runner` for detectors: ``process`` turns a batch into rows, several per image."""

    def __init__(self, lm: LoadedModel, method: str = default("method"), analyze: bool = True,
                 topk: float = default("topk"), meta_types: dict | None = None, budget: int = default("budget"),
                 seed: int = default("seed"), amp: str = default("amp"),
                 score_threshold: float = default("score_threshold"), annotations: str | None = None,
                 max_batch: int = 1 << 30):
        self._setup(lm, analyze, topk, meta_types, amp, max_batch, batched=False)  # detectors take a list of images
        self.score_threshold = check_score_threshold(score_threshold)
        self.coco = load_coco(annotations) if annotations else None
        self.target = "predicted"  # the detections themselves are explained
        self.black_box = str(method).lower() == "drise"
        if self.black_box:
            check_budget(budget)
            self.detector = lm.backend if lm.backend is not None else lm.detector_backend()
            self.engine = _Drise(self.detector, int(budget), int(seed))
        elif lm.model is None:
            raise MethodError(f"{canonical(method)!r} needs the detector's gradients, but model card {lm.card.name!r} "
                              f"is kind {lm.card.kind!r}, a black box: use method drise")
        else:
            name = canonical(method)
            self.engine = DetectionCamEngine(lm.model, lm.layers(), name, lm.reshape_transform)
        self.layer_name = None if self.black_box else ",".join(lm.target_layers)
        self._gt: dict[int, list | None] = {}

    # -- ground truth ----------------------------------------------------------------------------
    def _ground_truth(self, s: Sample):
        cell = s.item.boxes
        if self.coco is not None and cell is None:
            cell = self.coco.cell_for(s.item.image)
        card = self.lm.card
        return parse_boxes(cell, card.classes, card.num_classes, s.size)

    def process(self, batch: list[Sample]) -> list[dict]:
        self._gt = {}
        for s in batch:
            if s.error is None:
                try:
                    self._gt[s.item.index] = self._ground_truth(s)
                except ValueError as e:  # the image's boxes are unusable: its row says why
                    s.error, s.error_kind = f"image {s.item.image} (id {s.item.image_id}): {e}", "input"
        return super().process(batch)

    def probe(self, n: int) -> None:
        x = torch.zeros(n, 3, *self.lm.input.size, device=self.lm.device)
        with gpu.autocast(self.lm.device, self.amp):
            self._explain(x, [None] * n, [0] * n)

    # -- maps --------------------------------------------------------------------------------------
    def _select(self, gts):
        """select(i, output) for the engine, and where it keeps each image's ground-truth matches."""
        matches: dict[int, list] = {}

        def select(i: int, out) -> list[int]:
            keep = (out["scores"] >= self.score_threshold).nonzero()[:, 0].tolist()
            if gts[i] is None:
                return keep
            ks = torch.tensor(keep, dtype=torch.long)
            m = match(out["boxes"][ks].cpu(), out["labels"][ks].cpu(), out["scores"][ks].cpu(), gts[i][1], IOU_MATCH)
            matches[i] = [(g, None if d is None else keep[d], iou) for g, d, iou in m]
            return sorted({d for _, d, _ in matches[i] if d is not None})

        return select, matches

    def _explain(self, x: torch.Tensor, gts, rows: list[int]):
        select, matches = self._select(gts)
        if self.black_box:
            return self.engine(x, select, rows), matches
        return self.engine(x, select=select), matches

    def _compute(self, samples: list[Sample], rows: list[dict], targets: list[int]) -> None:
        dev, spec, card = self.lm.device, self.lm.input, self.lm.card
        x = torch.stack([s.x for s in samples]).to(dev, non_blocking=True)
        gts = []
        for s in samples:  # ground truth in the model's input pixels, for matching
            gt = self._gt.get(s.item.index)
            gts.append(None if gt is None else (gt, [GtBox(spec.box_to_input(g.box, s.size), g.label) for g in gt]))
        with gpu.autocast(dev, self.amp):
            maps, matches = self._explain(x, gts, [s.item.index for s in samples])
        good, good_cams, good_masks, good_boxes = [], [], [], []
        for i, (s, row, dm) in enumerate(zip(samples, rows, maps)):
            index = dm.extra["index"].tolist()
            cams = dm.maps.float()
            finite = torch.isfinite(cams).flatten(1).all(1).tolist() if len(index) else []
            objects = []
            by_det = {d: k for k, d in enumerate(index)}
            plan = ([(None, d, None) for d in index] if gts[i] is None else matches.get(i, []))
            for g, d, iou in plan:
                o = {"status": "ok", "error": None, "error_kind": None, "gt_index": g,
                     "iou": None if iou is None else float(iou)}
                if g is not None:
                    gt = gts[i][0][g]
                    o["label"] = card.classes[gt.label] if card.classes else str(gt.label)
                if d is None:  # a ground-truth box no detection matched
                    x1, y1, x2, y2 = gts[i][0][g].box
                    o.update(status="missed", target_class=gts[i][0][g].label,
                             box_x1=x1, box_y1=y1, box_x2=x2, box_y2=y2)
                    objects.append(o)
                    continue
                k = by_det[d]
                cls = int(dm.labels[k])
                box = spec.box_from_input(tuple(float(v) for v in dm.boxes[k]), s.size)
                o.update(det_index=d, det_class=cls, det_label=card.classes[cls] if card.classes else None,
                         det_score=float(dm.scores[k]), predicted_class=cls, predicted_score=float(dm.scores[k]),
                         predicted_label=card.classes[cls] if card.classes else None, target_class=cls,
                         box_x1=box[0], box_y1=box[1], box_x2=box[2], box_y2=box[3],
                         cam_height=cams.shape[1], cam_width=cams.shape[2], cam=res.cam_bytes(cams[k].cpu()))
                if not finite[k]:
                    o.update(status="error", error_kind="model", cam=None,
                             error=f"image {s.item.image} (id {s.item.image_id}): detection {d}: the heatmap "
                                   f"has NaN/Inf")
                elif self.analyze:
                    good.append(o)
                    good_cams.append(cams[k])
                    good_masks.append(s.mask.to(dev, non_blocking=True))
                    good_boxes.append(spec.box_to_region(box, s.size))
                objects.append(o)
            row.update(status="no_detection", error=None, error_kind=None)
            if objects:
                row["_objects"] = objects
        apply_metrics(good, good_cams, good_masks, self.topk, good_boxes)


class _Drise:
    """D-RISE for a black-box detector with :class:`DetectionRunner`'s selection of detections."""

    method = "drise"

    def __init__(self, detector, budget: int, seed: int):
        self.detector, self.budget, self.seed = detector, budget, seed

    def __call__(self, x: torch.Tensor, select, rows: list[int]):
        return drise_detections(self.detector, x, budget=self.budget, seeds=[row_seed(self.seed, r) for r in rows],
                                select=select)

    def close(self):
        pass
