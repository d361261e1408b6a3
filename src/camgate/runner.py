"""Model card + data -> CAMs -> metrics -> results Parquet, batch by batch.

``run`` does the whole step on the model's device; with ``analyze=False`` it writes the heatmaps
only (predictions + raw maps, no masks needed) and ``analyze`` later turns such a file plus masks
into results — the two halves the KFP pipeline runs as separate tasks.

Every item yields exactly one row: a problem with one item becomes that row's ``error`` and the run
goes on; problems of the whole run (model card, method, data set, target) raise before any compute.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
import torch

from . import __version__, storage
from . import results as res
from .analysis import TOPK_DEFAULT, invalid_metrics
from .cam import CamEngine
from .data import DataError, Item, MaskSpec, Sample, StaticMask, iter_batches, load_items
from .modelspec import InputSpec, LoadedModel, load_model



@dataclass
class RunSummary:
    out: str
    rows: int = 0
    counts: dict = field(default_factory=lambda: {s: 0 for s in res.STATUSES})
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"out": self.out, "rows": self.rows, "counts": self.counts, "seconds": round(self.seconds, 3),
                "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def parse_target(target: str | int | None, num_classes: int) -> str | int:
    """'predicted' | 'label' | class index."""
    if target is None or target == "predicted":
        return "predicted"
    if target == "label":
        return "label"
    try:
        t = int(target)
    except (TypeError, ValueError):
        raise ValueError(f"target must be 'predicted', 'label' or a class index, got {target!r}") from None
    if not 0 <= t < num_classes:
        raise ValueError(f"target class {t} is outside the model's {num_classes} classes")
    return t


def label_index(label, classes: list[str] | None, num_classes: int) -> int:
    """A manifest label (class index or class name) -> index; ValueError naming the problem."""
    if label is None:
        raise ValueError("no label for this item (target 'label' needs a label column)")
    if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
        i = int(label)
        if 0 <= i < num_classes:
            return i
        raise ValueError(f"label {label} is outside the model's {num_classes} classes")
    if classes and str(label) in classes:
        return classes.index(str(label))
    known = f"one of {classes}" if classes else "a class index (the model card lists no class names)"
    raise ValueError(f"label {label!r} is not {known}")


class Runner:
    """Holds the loaded model and engine; ``process`` turns one batch of samples into rows."""

    def __init__(self, lm: LoadedModel, method: str = "gradcam", target: str | int = "predicted",
                 analyze: bool = True, topk: float = TOPK_DEFAULT, meta_types: dict | None = None):
        self.lm, self.analyze, self.topk = lm, analyze, topk
        self.meta_types = meta_types or {}
        self.engine = CamEngine(lm.model, lm.layers(), method, lm.reshape_transform)
        self.target = parse_target(target, lm.card.num_classes)
        self.layer_name = ",".join(lm.target_layers)

    def _target_of(self, item: Item) -> int:
        if self.target == "predicted":
            return -1
        if self.target == "label":
            return label_index(item.label, self.lm.card.classes, self.lm.card.num_classes)
        return int(self.target)

    def base_row(self, s: Sample) -> dict:
        it = s.item
        row = {"image_id": it.image_id, "image": it.image, "mask": it.mask,
               "label": None if it.label is None else str(it.label),
               "method": self.engine.method, "target_layer": self.layer_name, "status": "error"}
        if s.size:
            row["image_width"], row["image_height"] = s.size
        for name, typ in self.meta_types.items():
            row[res.meta_column(name)] = res.meta_value(it.meta.get(name), typ)
        return row

    def process(self, batch: list[Sample]) -> list[dict]:
        rows = [self.base_row(s) for s in batch]
        todo: list[int] = []
        targets: list[int] = []
        for i, s in enumerate(batch):
            err = s.error
            if err is None and self.analyze and s.mask is None:
                err = (f"image {s.item.image} (id {s.item.image_id}): no mask "
                       f"(give a mask column, a masks/ folder or a static mask)")
            if err is None:
                try:
                    targets.append(self._target_of(s.item))
                except ValueError as e:
                    err = f"image {s.item.image} (id {s.item.image_id}): {e}"
            if err is None:
                todo.append(i)
            else:
                rows[i]["error"] = err
        if todo:
            try:
                self._compute([batch[i] for i in todo], [rows[i] for i in todo], targets)
            except Exception:  # noqa: BLE001 - find the item that breaks the batch, keep the rest
                for i, t in zip(todo, targets):
                    try:
                        self._compute([batch[i]], [rows[i]], [t])
                    except Exception as e:  # noqa: BLE001
                        rows[i].update(status="error", error=f"image {batch[i].item.image} "
                                       f"(id {batch[i].item.image_id}): {type(e).__name__}: {e}")
        return rows

    def _compute(self, samples: list[Sample], rows: list[dict], targets: list[int]) -> None:
        dev = self.lm.device
        x = torch.stack([s.x for s in samples]).to(dev, non_blocking=True)
        cb = self.engine(x, torch.tensor(targets, device=dev))
        probs = torch.softmax(cb.logits.float(), 1)
        pred = probs.argmax(1)
        finite = torch.isfinite(cb.logits).all(1) & torch.isfinite(cb.cams).flatten(1).all(1)
        m = None
        if self.analyze:
            m = invalid_metrics(cb.cams, [s.mask.to(dev, non_blocking=True) for s in samples], self.topk).rows()
        # the batch's only device -> host transfer: finished values
        host = {"pred": pred.tolist(), "score": probs.gather(1, pred[:, None])[:, 0].tolist(),
                "target": cb.targets.tolist(), "finite": finite.tolist()}
        cams = cb.cams.float().cpu()
        classes = self.lm.card.classes
        for i, row in enumerate(rows):
            if not host["finite"][i]:
                row["error"] = (f"image {samples[i].item.image} (id {samples[i].item.image_id}): "
                                f"the model produced NaN/Inf (outputs or heatmap)")
                continue
            p = host["pred"][i]
            row.update(status="ok", error=None, predicted_class=p, predicted_score=host["score"][i],
                       predicted_label=classes[p] if classes else None, target_class=host["target"][i],
                       cam_height=cams.shape[1], cam_width=cams.shape[2], cam=res.cam_bytes(cams[i]))
            if m is not None:
                row.update(metric_values(m[i]))


def metric_values(mi: dict) -> dict:
    """Metric dict from analysis -> row fields, with the no_activation status."""
    out = {k: mi[k] for k in ("invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid",
                              "topk_invalid_share")}
    if not mi["active"]:
        out.update(status="no_activation", peak_in_invalid=None)
    return out


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def run(model: str | LoadedModel, data: str, out: str, *, method: str = "gradcam",
        target: str | int = "predicted", target_layer: str | list[str] | None = None,
        static_mask: str | None = None, mask_spec: MaskSpec = MaskSpec(), batch_size: int = 16,
        device: str = "auto", workers: int = 4, topk: float = TOPK_DEFAULT, analyze: bool = True,
        policy: str | None = None, progress: bool = True, checkpoint_rows: int = 256) -> RunSummary:
    """The heatmap test step. Raises (before any compute) only for problems of the whole run.

    Rows are committed every ``checkpoint_rows`` rows; re-running the same command after a crash
    resumes from there (see :class:`camgate.results.ResultsWriter`)."""
    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, target_layer=target_layer)
    runner = Runner(lm, method, target, analyze, topk)  # method and target fail before data is read
    items = load_items(data, static_mask if analyze else None)
    runner.meta_types = meta_cols = res.meta_types(it.meta for it in items)
    if not analyze:  # heatmaps only: masks are not read
        items = [replace(it, mask=None) for it in items]
    sm = StaticMask(static_mask) if (static_mask and analyze) else None
    md = {"camgate_version": __version__, "stage": "results" if analyze else "heatmaps",
          "model": lm.metadata(), "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256,
          "method": runner.engine.method, "target": str(runner.target), "target_layer": lm.target_layers,
          "data": data, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk, "policy": policy,
          "policy_sha256": _sha_or_none(policy)}
    schema = res.schema(meta_cols, md)
    summary = RunSummary(out)
    with res.ResultsWriter(out, schema, checkpoint_rows, _fingerprint(md, items)) as w, \
            _progress(len(items), progress) as bar:
        # rows committed by an interrupted run of the same command are not computed again
        for st in w.resumed_status:
            summary.rows += 1
            summary.counts[st] += 1
        bar.update(w.resumed)
        batches = iter_batches(items[w.resumed:], lm.input, mask_spec, batch_size, workers=workers, static_mask=sm)
        for batch in batches:
            rows = runner.process(batch)
            w.write(rows)
            _count(summary, rows)
            bar.update(len(rows))
    runner.engine.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _count(summary: RunSummary, rows: Iterable[dict]) -> None:
    for r in rows:
        summary.rows += 1
        summary.counts[r["status"]] += 1


def _fingerprint(md: dict, items: list[Item]) -> str:
    """Everything that determines the rows: run settings, model hashes and the items themselves."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(md, sort_keys=True, default=str).encode())
    for it in items:
        h.update(json.dumps([it.image_id, it.image, it.mask, it.label, it.meta, it.error],
                            sort_keys=True, default=str).encode())
    return h.hexdigest()


def _sha_or_none(uri: str | None) -> str | None:
    if not uri:
        return None
    import hashlib

    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except storage.StorageError:
        return None


def analyze(heatmaps: str, out: str, *, data: str | None = None, static_mask: str | None = None,
            mask_spec: MaskSpec = MaskSpec(), input_spec: InputSpec | None = None,
            topk: float = TOPK_DEFAULT, batch_size: int = 64, device: str = "cpu",
            workers: int = 8, progress: bool = True) -> RunSummary:
    """Heatmaps Parquet (from ``run(..., analyze=False)``) + masks -> results Parquet.

    Masks come from ``static_mask``, else from ``data`` (the manifest, matched row by row), else from
    the heatmaps' own ``mask`` column. The mask is cut to the image region the model saw, using the
    model's input spec recorded in the heatmaps file.
    """
    t0 = time.perf_counter()
    pf = res.open_file(heatmaps)
    n = pf.metadata.num_rows
    md = res.run_metadata(pf.schema_arrow)
    spec = input_spec or InputSpec.from_card(md.get("model", {}).get("input"))
    if data:
        items = load_items(data, static_mask)
        if len(items) != n:
            raise DataError(f"data {data} has {len(items)} items but heatmaps {heatmaps} has {n} rows")
        masks = [it.mask for it in items]
    else:
        masks = [static_mask] * n if static_mask else pf.read(columns=["mask"]).column("mask").to_pylist()
    sm = StaticMask(static_mask) if static_mask else None
    md.update(stage="results", static_mask=static_mask, topk=topk, analyzed_with=__version__,
              mask_spec=mask_spec.to_dict())
    schema = pf.schema_arrow.with_metadata({res.META_KEY: res.schema(None, md).metadata[res.META_KEY]})
    summary = RunSummary(out)
    dev = torch.device(device)
    start = 0
    with res.ResultsWriter(out, schema) as w, _progress(n, progress) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="camgate-mask") as pool:
        for batch in pf.iter_batches(batch_size=batch_size):  # the file is never held as Python rows
            rows = batch.to_pylist()
            _analyze_rows(rows, masks[start:start + len(rows)], spec, mask_spec, sm, topk, dev, pool)
            start += len(rows)
            w.write(rows)
            _count(summary, rows)
            bar.update(len(rows))
    summary.seconds = time.perf_counter() - t0
    return summary


def _mask_for(row: dict, muri: str | None, spec: InputSpec, mask_spec: MaskSpec, sm) -> np.ndarray:
    """The invalid mask of the image region the model saw; ValueError/StorageError naming the problem."""
    from .data import decode_mask, model_view

    if not muri:
        raise ValueError("no mask (give a mask column, a masks/ folder or a static mask)")
    size = (row.get("image_width"), row.get("image_height"))
    full = sm.get(mask_spec, size) if sm else decode_mask(storage.read_bytes(muri), muri, mask_spec, size)
    return model_view(full, spec, size)


def _analyze_rows(rows, mask_uris, spec, mask_spec, sm, topk, dev, pool) -> None:
    todo = []
    for row, muri in zip(rows, mask_uris):
        row["mask"] = muri
        if row["status"] != "error" and row.get("cam") is not None:
            todo.append((row, pool.submit(_mask_for, row, muri, spec, mask_spec, sm)))  # fetched in parallel
    ready, cams, masks = [], [], []
    for row, fut in todo:
        try:
            masks.append(torch.from_numpy(fut.result()).to(dev))
        except (storage.StorageError, ValueError) as e:
            row.update(status="error", error=f"mask {row['mask']} (id {row['image_id']}): {e}")
            continue
        ready.append(row)
        cams.append(torch.from_numpy(res.cam_array(row)).to(dev))
    if not ready:
        return
    for row, mi in zip(ready, invalid_metrics(cams, masks, topk).rows()):
        row.update(status="ok", error=None)
        row.update(metric_values(mi))
