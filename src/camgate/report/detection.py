"""Detection runs in the reports: one results row per (image, explained detection), keyed by
(``row``, ``det_index``); ``no_detection`` rows (an image without a detection: no map) and ``missed``
rows (a ground-truth box no detection matched: no map) beside ok / no_activation / error.

Classification results have none of these columns: every helper here leaves them as they were.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..io.results import BOX_COLUMNS as BOX
from ..io.results import DETECTION_FIELDS, TASK_STATUSES, file_identity, run_metadata

TASK = "detection"
COLUMNS = tuple(name for name, _ in DETECTION_FIELDS)
STATUSES = ("ok", "no_activation", "error", *TASK_STATUSES["detection"])  # a detection run's rows
_MAPPED = ("ok", "no_activation")  # statuses of a detection whose map was computed


def _given(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))  # pandas gives NaN for null


def is_detection(table: pa.Table) -> bool:
    """Whether a results table is a detection run's: its metadata says so (``identity.task`` or
    ``model.task``), or it has the ``det_index`` column."""
    if "det_index" in table.column_names:
        return True
    md = run_metadata(table)
    ident = md.get("identity") if isinstance(md.get("identity"), dict) else {}
    model = md.get("model") if isinstance(md.get("model"), dict) else {}
    return TASK in (ident.get("task"), model.get("task"))


def row_key(r: dict, per_class: bool = False):
    """What a row's picture is keyed by: ``row`` (classification), ``(row, det_index)`` for a
    detection's row, ``(row, 'class', target_class)`` for a segmentation / multi-label class's row
    (``per_class``; several rows share an image's ``row``)."""
    det = r.get("det_index")
    if _given(det):
        return int(r["row"]), int(det)
    if per_class and _given(r.get("target_class")):
        return int(r["row"]), "class", int(r["target_class"])
    return r["row"]


def per_class_task(md: dict) -> bool:
    """Whether a file's rows are per (image, class): segmentation and multi-label runs."""
    return file_identity(md).get("task") in ("segmentation", "multilabel")


def _strings(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).cast(pa.string()).to_numpy(zero_copy_only=False)


def summary(table: pa.Table) -> dict:
    """What a detection run covered: images (distinct ``row``), result rows, detections (rows with a
    ``det_index``), detections explained (a map was computed), and the rows of each status."""
    status = _strings(table, "status")
    if "det_index" in table.column_names:
        det = ~np.asarray(table.column("det_index").is_null().to_numpy(zero_copy_only=False), bool)
    else:
        det = np.zeros(table.num_rows, bool)
    images = (len(table.column("row").unique()) if "row" in table.column_names else table.num_rows)
    out = {"task": TASK, "images": int(images), "rows": int(table.num_rows), "detections": int(det.sum()),
           "explained": int((det & np.isin(status, _MAPPED)).sum())}
    out.update({s: int((status == s).sum()) for s in STATUSES})
    return out


def class_task(table: pa.Table) -> str | None:
    """``segmentation`` or ``multilabel`` for a file of per-(image, class) rows, else None."""
    task = file_identity(run_metadata(table)).get("task")
    return task if task in ("segmentation", "multilabel") else None


def class_summary(table: pa.Table, task: str) -> dict:
    """What a segmentation / multi-label run covered: images (distinct ``row``), result rows, classes
    explained (rows with a map), the rows of each status, and the explained rows per class."""
    status = _strings(table, "status")
    images = len(table.column("row").unique()) if "row" in table.column_names else table.num_rows
    statuses = ("ok", "no_activation", "error", *TASK_STATUSES[task])
    mapped = np.isin(status, _MAPPED)
    labels = [label_of(r) for r, m in zip(table.select([c for c in ("predicted_label", "predicted_class")
                                                         if c in table.column_names]).to_pylist(), mapped) if m]
    return {"task": task, "images": int(images), "rows": int(table.num_rows), "explained": int(mapped.sum()),
            **{s: int((status == s).sum()) for s in statuses},
            "classes": {k: labels.count(k) for k in sorted(set(labels))}}


def mean_of(table: pa.Table, name: str) -> float | None:
    """Mean of a column over the ok rows (None where absent or empty)."""
    if name not in table.column_names:
        return None
    ok = _strings(table, "status") == "ok"
    v = table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)[ok]
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def box_of(r: dict) -> tuple[float, float, float, float] | None:
    """The row's box (x1, y1, x2, y2) in original image pixels, or None."""
    v = [r.get(k) for k in BOX]
    return tuple(float(x) for x in v) if all(_given(x) for x in v) else None


def box_text(r: dict) -> str:
    b = box_of(r)
    return ", ".join(f"{x:.0f}" for x in b) if b else "n/a"


def label_of(r: dict) -> str:
    """The detection's class: its label, else its class index."""
    for key in ("det_label", "det_class", "predicted_label", "predicted_class"):
        v = r.get(key)
        if _given(v) and str(v) != "":
            return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    return ""


def caption(r: dict) -> str:
    """The text drawn by a detection's box: ``label score``, and the IoU with its ground truth."""
    score = r.get("det_score", r.get("predicted_score"))
    text = label_of(r) + (f" {float(score):.2f}" if _given(score) else "")
    if _given(r.get("iou")):
        text += f" IoU {float(r['iou']):.2f}"
    elif r.get("status") == "missed":
        text += " missed"
    return text.strip()


def gt_text(r: dict) -> str:
    gt, iou = r.get("gt_index"), r.get("iou")
    if not _given(gt):
        return "n/a"
    return f"{int(gt)}" + (f" (IoU {float(iou):.2f})" if _given(iou) else "")
