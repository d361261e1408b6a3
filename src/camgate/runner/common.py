"""What every run verb shares: the summary, the class to explain, splitting a batch into items to
compute and items that failed, isolating the item that breaks a batch, and writing metrics into rows.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..data import device as gpu
from ..data.decode import Sample
from ..data.manifest import Item, label_index
from ..errors import ConfigError
from ..io import results as res
from ..metrics.invalid import box_metrics, invalid_metrics, region_metrics


@dataclass
class RunSummary:
    out: str
    rows: int = 0
    counts: dict = field(default_factory=lambda: {s: 0 for s in res.STATUSES})
    seconds: float = 0.0
    resumed: int = 0   # rows taken from the committed parts of an interrupted run
    computed: int = 0  # rows computed by this invocation (retried rows included)
    storage_errors: int = 0  # error rows caused by the storage service: the same command retries them

    def to_dict(self) -> dict:
        return {"out": self.out, "rows": self.rows, "counts": self.counts, "seconds": round(self.seconds, 3),
                "resumed": self.resumed, "computed": self.computed, "storage_errors": self.storage_errors,
                "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def classifier_only(lm, what: str) -> None:
    """Refuse a detector, segmentation or multi-label model where only single-label classifiers are
    supported (before any data is read)."""
    task = getattr(lm.card, "task", "classification")
    if task != "classification":
        kind = {"detection": "a detector", "segmentation": "a segmentation model",
                "multilabel": "a multi-label model"}.get(task, task)
        raise ConfigError(f"{what} explains single-label classifiers; model card {lm.card.name!r} is {kind} "
                          f"(task {task}): its per-object maps and metrics come from `camgate run`")


def parse_target(target: str | int | None, num_classes: int) -> str | int:
    """'predicted' | 'label' | class index."""
    if target is None or target == "predicted":
        return "predicted"
    if target == "label":
        return "label"
    try:
        t = int(target)
    except (TypeError, ValueError):
        raise ConfigError(f"target must be 'predicted', 'label' or a class index, got {target!r}") from None
    if not 0 <= t < num_classes:
        raise ConfigError(f"target class {t} is outside the model's {num_classes} classes")
    return t


def item_target(item: Item, target: str | int, card) -> int:
    """The class to explain for one item (-1 = its predicted class); ValueError naming the problem."""
    if target == "predicted":
        return -1
    if target == "label":
        return label_index(item.label, card.classes, card.num_classes)
    return int(target)


def row_seed(seed: int, row: int) -> int:
    """An image's own seed, from the run's seed and its manifest ``row``: what a seeded method draws for
    an image then depends neither on the batch it ran in nor on which rows ran before it."""
    return int(seed) * 1_000_003 + int(row)


def triage(batch: list[Sample], target, card, need_mask: bool) -> tuple[list[int], list[int], dict]:
    """A batch -> (positions to compute, their target classes, {position: (error, error_kind)} for the
    rest): items that failed to load, lack a needed mask, or whose target class cannot be had."""
    todo, targets, failed = [], [], {}
    for i, s in enumerate(batch):
        err, kind = s.error, s.error_kind or "input"
        if err is None and need_mask and s.mask is None:
            err = (f"image {s.item.image} (id {s.item.image_id}): no mask "
                   f"(give a mask column, a masks/ folder or a static mask)")
        if err is None:
            try:
                targets.append(item_target(s.item, target, card))
                todo.append(i)
                continue
            except ValueError as e:
                err = f"image {s.item.image} (id {s.item.image_id}): {e}"
        failed[i] = (err, kind)
    return todo, targets, failed


def guarded(compute, todo: list[int], targets: list[int], fail, oom: bool = False) -> None:
    """``compute(todo, targets)`` for the whole batch; if the model raises, item by item, so only the
    item that breaks it fails (``fail(position, exception)``) and the rest of the batch is kept.
    ``oom=True``: out-of-memory of the whole batch is raised for the caller to split the batch."""
    if not todo:
        return
    try:
        compute(todo, targets)
    except Exception as e:  # noqa: BLE001 - find the item that breaks the batch
        if oom and gpu.is_oom(e):
            raise
        for i, t in zip(todo, targets):
            try:
                compute([i], [t])
            except Exception as e:  # noqa: BLE001
                fail(i, e)


def apply_metrics(rows: list[dict], cams: list[torch.Tensor], masks: list[torch.Tensor], topk: float,
                  boxes: list | None = None, regions: list | None = None) -> None:
    """Invalid-pixel metrics of each row's map and mask into the row (status ``ok`` or ``no_activation``).

    The one place metrics meet rows: ``run`` (maps fresh from the engine) and ``analyze`` (maps decoded
    from a heatmaps file) both call it with the same float32 maps, so both give the same numbers. ``boxes``:
    detections' boxes in the mask's pixels; ``regions``: segmentation classes' bool regions (any size)."""
    if not rows:
        return
    for row, mi in zip(rows, invalid_metrics(cams, masks, topk).rows()):
        row.update(status="ok", error=None, error_kind=None)
        row.update({k: mi[k] for k in ("invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid",
                                       "topk_invalid_share", "relevance_rank_accuracy", "auc")})
        if not mi["active"]:
            row.update(status="no_activation", peak_in_invalid=None)
    if boxes is not None:  # detections: each row's box in the mask's pixels
        for row, bm in zip(rows, box_metrics(cams, masks, boxes)):
            row.update(bm)
    if regions is not None:
        for row, rm in zip(rows, region_metrics(cams, masks, regions)):
            row.update(rm)


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def count_statuses(summary: RunSummary, statuses: Iterable[str]) -> None:
    for st in statuses:
        summary.rows += 1
        summary.counts[st] += 1
