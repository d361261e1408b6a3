"""Model card + data -> CAMs -> metrics -> results Parquet, batch by batch.

``run`` does the whole step on the model's device; with ``analyze=False`` it writes the heatmaps
only (predictions + raw maps, no masks needed) and ``analyze`` later turns such a file plus masks
into results — the two halves the KFP pipeline runs as separate tasks.

Every item yields exactly one row: a problem with one item becomes that row's ``error`` and the run
goes on; problems of the whole run (model card, method, data set, target) raise before any compute.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from . import __version__, gpu, storage
from . import results as res
from .analysis import TOPK_DEFAULT, check_topk, invalid_metrics
from .cam import NATIVE, CamEngine, MethodError, canonical
from .data import DataError, Item, MaskSpec, Sample, StaticMask, iter_batches, load_items, storage_error_kind
from .errors import ConfigError
from .modelspec import InputSpec, LoadedModel, load_model

log = logging.getLogger(__name__)


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


class Runner:
    """Holds the loaded model and engine; ``process`` turns one batch of samples into rows.

    Black-box methods (``decam``, ``rise``) reach the model only through its outputs: the card's
    backend for ``kind: onnx|callable``, the module wrapped as a backend for torch cards. They take
    ``budget`` masked forward passes per image, and seed each image from ``seed`` and its manifest
    ``row``, so a map depends neither on the batch it ran in nor on which rows ran before it.
    """

    class _BlackBox:
        """What ``run`` needs of an engine (``method``, ``close``) for a black-box method."""

        def __init__(self, backend, method: str, budget: int, seed: int):
            self.backend, self.method, self.budget, self.seed = backend, method, int(budget), int(seed)

        def __call__(self, x: torch.Tensor, targets: torch.Tensor, rows: list[int]):
            from .cam import blackbox

            seeds = [row_seed(self.seed, r) for r in rows]
            return blackbox.explain(self.backend, x, self.method, targets, budget=self.budget, seeds=seeds)

        def close(self):
            pass

    def __init__(self, lm: LoadedModel, method: str = "gradcam", target: str | int = "predicted",
                 analyze: bool = True, topk: float = TOPK_DEFAULT, meta_types: dict | None = None,
                 budget: int = 1024, seed: int = 0, amp: str = "off", max_batch: int = 1 << 30):
        from .backends import TorchBackend
        from .cam import BLACKBOX

        self.lm, self.analyze, self.topk = lm, analyze, topk
        self.amp = gpu.check_amp(amp)
        self.split = gpu.OomSplitter(max_batch)  # halves the compute batch on out-of-memory
        # conv models on CUDA run in channels_last (converted in place), and their inputs alike
        self.memory_format = torch.channels_last if (
            lm.model is not None and gpu.channels_last(lm.model, lm.device)) else torch.contiguous_format
        self.meta_types = meta_types or {}
        name = canonical(method)
        self.black_box = name in BLACKBOX
        if self.black_box:
            if int(budget) < 1:
                raise ConfigError(f"budget must be >= 1 forward pass per image, got {budget}")
            backend = lm.backend if lm.backend is not None else \
                TorchBackend(lm.model, lm.device, lm.card.num_classes)
            self.engine = Runner._BlackBox(backend, name, budget, seed)
        elif lm.model is None:
            raise MethodError(f"{name!r} needs the model's gradients or layers, but model card {lm.card.name!r} is "
                              f"kind {lm.card.kind!r}, a black box: use method decam or rise")
        else:
            self.engine = CamEngine(lm.model, lm.layers(), method, lm.reshape_transform)
        self.target = parse_target(target, lm.card.num_classes)
        self.layer_name = None if self.black_box else ",".join(lm.target_layers)

    def base_row(self, s: Sample) -> dict:
        it = s.item
        row = {"row": it.index, "image_id": it.image_id, "image": it.image, "mask": it.mask,
               "label": None if it.label is None else str(it.label),
               "method": self.engine.method, "target_layer": self.layer_name, "status": "error"}
        if s.size:
            row["image_width"], row["image_height"] = s.size
        for name, typ in self.meta_types.items():
            row[res.meta_column(name)] = res.meta_value(it.meta.get(name), typ)
        return row

    def process(self, batch: list[Sample]) -> list[dict]:
        rows = [self.base_row(s) for s in batch]
        todo, targets, failed = triage(batch, self.target, self.lm.card, self.analyze)
        for i, (err, kind) in failed.items():
            rows[i].update(error=err, error_kind=kind)

        def fail(i: int, e: Exception) -> None:
            rows[i].update(status="error", error_kind="model", error=f"image {batch[i].item.image} "
                           f"(id {batch[i].item.image_id}): {type(e).__name__}: {e}")

        self.split.run(lambda idx, ts: guarded(
            lambda i2, t2: self._compute([batch[i] for i in i2], [rows[i] for i in i2], t2), idx, ts, fail, oom=True),
            todo, targets, fail)
        return rows

    def probe(self, n: int) -> None:
        """The compute of ``n`` blank images, results dropped (sizes the batch to the GPU's memory)."""
        dev = self.lm.device
        x = torch.zeros(n, 3, *self.lm.input.size, device=dev).contiguous(memory_format=self.memory_format)
        t = torch.full((n,), -1, device=dev)
        with gpu.autocast(dev, self.amp):
            cb = self.engine(x, t, list(range(n))) if self.black_box else self.engine(x, t)
        del cb

    def _compute(self, samples: list[Sample], rows: list[dict], targets: list[int]) -> None:
        dev = self.lm.device
        x = torch.stack([s.x for s in samples]).to(dev, non_blocking=True).contiguous(memory_format=self.memory_format)
        t = torch.tensor(targets, device=dev)
        # black-box maps come at grid (DE-CAM) or input (RISE) resolution: stored raw like any other map
        with gpu.autocast(dev, self.amp):
            cb = self.engine(x, t, [s.item.index for s in samples]) if self.black_box else self.engine(x, t)
        cams = cb.cams.float()  # what is stored, and what the metrics are computed from
        probs = torch.softmax(cb.logits.float(), 1)
        pred = probs.argmax(1)
        finite = torch.isfinite(cb.logits).all(1) & torch.isfinite(cams).flatten(1).all(1)
        # the batch's only device -> host transfer: finished values
        host = {"pred": pred.tolist(), "score": probs.gather(1, pred[:, None])[:, 0].tolist(),
                "target": cb.targets.tolist(), "finite": finite.tolist(), "cams": cams.cpu()}
        classes = self.lm.card.classes
        good, good_cams, good_masks = [], [], []
        for i, row in enumerate(rows):
            if not host["finite"][i]:
                row.update(error_kind="model", error=f"image {samples[i].item.image} (id {samples[i].item.image_id}): "
                                                     f"the model produced NaN/Inf (outputs or heatmap)")
                continue
            p = host["pred"][i]
            row.update(status="ok", error=None, error_kind=None, predicted_class=p, predicted_score=host["score"][i],
                       predicted_label=classes[p] if classes else None, target_class=host["target"][i],
                       cam_height=cams.shape[1], cam_width=cams.shape[2], cam=res.cam_bytes(host["cams"][i]))
            if self.analyze:
                good.append(row)
                good_cams.append(cams[i])
                good_masks.append(samples[i].mask.to(dev, non_blocking=True))
        apply_metrics(good, good_cams, good_masks, self.topk)


def apply_metrics(rows: list[dict], cams: list[torch.Tensor], masks: list[torch.Tensor], topk: float) -> None:
    """Invalid-pixel metrics of each row's map and mask into the row (status ``ok`` or ``no_activation``).

    The one place metrics meet rows: ``run`` (maps fresh from the engine) and ``analyze`` (maps decoded
    from a heatmaps file) both call it with the same float32 maps, so both give the same numbers."""
    if not rows:
        return
    for row, mi in zip(rows, invalid_metrics(cams, masks, topk).rows()):
        row.update(status="ok", error=None, error_kind=None)
        row.update({k: mi[k] for k in ("invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid",
                                       "topk_invalid_share")})
        if not mi["active"]:
            row.update(status="no_activation", peak_in_invalid=None)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def run(model: str | LoadedModel, data: str, out: str, *, method: str = "gradcam",
        target: str | int = "predicted", target_layer: str | list[str] | None = None,
        static_mask: str | None = None, mask_spec: MaskSpec = MaskSpec(), batch_size: int | str = 16,
        device: str = "auto", workers: int = 4, topk: float = TOPK_DEFAULT, analyze: bool = True,
        policy: str | None = None, progress: bool = True, checkpoint_rows: int = 256,
        checkpoint: str | None = None, budget: int = 1024, seed: int = 0, amp: str = "off",
        decode: str = "auto") -> RunSummary:
    """The heatmap test step. Raises (before any compute) only for problems of the whole run.

    With ``analyze=False`` only predictions and maps are computed (masks are not read; their URIs and
    the static mask stay in the file for :func:`analyze`). Rows are committed every
    ``checkpoint_rows`` rows under ``checkpoint`` (default ``<out>.parts``); re-running the same
    command after a crash resumes from there and computes again only the rows that are missing or
    failed on the storage service (see :class:`camgate.results.ResultsWriter`). ``budget`` and ``seed``:
    forward passes per image and the base seed of the black-box methods (decam, rise).

    Device path (:mod:`camgate.gpu`): ``amp`` ``off|bf16|fp16`` runs the model's forward and backward
    in that precision (maps and metrics stay float32); ``batch_size='auto'`` sizes batches to the free
    GPU memory (a fixed default on CPU); a batch that runs out of GPU memory is retried in halves.
    ``decode='auto'`` decodes JPEGs on the GPU when the model runs on CUDA, ``'cpu'`` always with PIL.
    On CUDA, conv models run in channels_last (the model passed in is converted in place)."""
    t0 = time.perf_counter()
    amp, decode, batch_size = gpu.check_amp(amp), gpu.check_decode(decode), gpu.parse_batch_size(batch_size)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, target_layer=target_layer)
    runner = Runner(lm, method, target, analyze, topk, budget=budget, seed=seed, amp=amp)  # fails before data is read
    check_topk(topk)
    dev = lm.device
    if batch_size == "auto":
        batch_size = gpu.auto_batch_size(dev, runner.probe)
    runner.split.limit = batch_size
    gpu_jpeg = decode == "auto" and dev.type == "cuda"
    loaders, overlap = gpu.cpu_budget(workers, dev)
    items = load_items(data, static_mask)
    runner.meta_types = meta_cols = res.meta_types(it.meta for it in items)
    sm = StaticMask(static_mask) if (static_mask and analyze) else None
    md = {"camgate_version": __version__, "stage": "results" if analyze else "heatmaps",
          "model": lm.metadata(), "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256,
          "method": runner.engine.method, "target": str(runner.target),
          "target_layer": [] if runner.black_box else lm.target_layers,
          **({"budget": budget, "seed": seed} if runner.black_box else {}),
          "data": data, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk, "policy": policy,
          "policy_sha256": _sha_or_none(policy), "amp": amp, "jpeg_decode": "gpu" if gpu_jpeg else "cpu"}
    schema = res.schema(meta_cols, {**md, **_provenance(lm, data)})
    summary = RunSummary(out)
    # full-precision CPU-decoded runs keep the fingerprint they had before these keys: they resume
    same = {k: v for k, v in md.items() if (k, v) not in (("amp", "off"), ("jpeg_decode", "cpu"))}

    def batches(todo: list[Item]):
        return gpu.prefetch(iter_batches(todo, lm.input, mask_spec, batch_size, workers=loaders, static_mask=sm,
                                         with_masks=analyze, overlap=overlap, defer_jpeg=gpu_jpeg),
                            dev, lm.input)

    with res.ResultsWriter(out, schema, checkpoint_rows, _fingerprint(same, items), checkpoint) as w, \
            _progress(len(items), progress) as bar:
        # rows committed by an interrupted run of the same command are not computed again, except
        # those that failed on the storage service: that may have been a passing outage
        if w.retry:
            redo = [r for batch in batches([items[i] for i in w.retry]) for r in runner.process(batch)]
            w.replace(w.retry, redo)
            summary.computed += len(redo)
        _count(summary, w.resumed_status)
        summary.resumed = w.resumed - len(w.retry)
        bar.update(w.resumed)
        for batch in batches(items[w.resumed:]):
            rows = runner.process(batch)
            w.write(rows)
            _count(summary, [r["status"] for r in rows])
            summary.computed += len(rows)
            bar.update(len(rows))
    runner.engine.close()
    summary.storage_errors = w.storage_errors
    if w.storage_errors:
        log.warning("%d rows failed on the storage service; their committed parts are kept under %s: run the "
                    "same command again to retry just those rows", w.storage_errors, w.parts)
    summary.seconds = time.perf_counter() - t0
    return summary


def _count(summary: RunSummary, statuses: Iterable[str]) -> None:
    for st in statuses:
        summary.rows += 1
        summary.counts[st] += 1


PROVENANCE = ("environment", "started_at", "data_sha256")  # the keys _provenance adds


def _provenance(lm: LoadedModel, data: str) -> dict:
    """What a test record needs beyond the settings: when and where the maps were computed and the
    manifest's hash. Kept out of the resume fingerprint: a run resumed elsewhere is the same run."""
    import datetime
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(lm.device),
           "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
           "cudnn_deterministic": torch.backends.cudnn.deterministic,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if lm.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(lm.device)
    return {"environment": env, "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data_sha256": manifest_sha256(data)}


def manifest_sha256(data) -> str | None:
    """sha256 of a manifest file; None for a prefix data set (no single file: its items are in the
    results) or a file that cannot be read."""
    from .data import MANIFEST_FORMATS

    if not data or os.path.splitext(str(data).rstrip("/"))[1].lower() not in MANIFEST_FORMATS:
        return None
    return _sha_or_none(str(data))


def _fingerprint(md: dict, items: list[Item]) -> str:
    """Everything that determines the rows: run settings, model hashes and the items themselves."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(md, sort_keys=True, default=str).encode())
    for it in items:
        h.update(json.dumps([it.index, it.image_id, it.image, it.mask, it.label, it.meta, it.error],
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
            mask_spec: MaskSpec | None = None, input_spec: InputSpec | None = None,
            topk: float = TOPK_DEFAULT, batch_size: int = 64, device: str = "cpu",
            workers: int = 8, progress: bool = True) -> RunSummary:
    """Heatmaps Parquet (from ``run(..., analyze=False)``) + masks -> results Parquet.

    Masks come from ``static_mask``, else from ``data`` (a manifest: heatmap row ``r`` takes manifest
    item ``r``, and the two must name the same image, else :class:`DataError` before anything is
    written), else from the heatmaps file itself (its ``mask`` column, or the static mask it was made
    with). The mask is cut to the image region the model saw, using the model's input spec recorded in
    the heatmaps file; the mask semantics default to the ones recorded there.
    """
    t0 = time.perf_counter()
    check_topk(topk)
    pf = res.open_file(heatmaps)
    n = pf.metadata.num_rows
    md = res.run_metadata(pf.schema_arrow)
    spec = input_spec or InputSpec.from_card(md.get("model", {}).get("input"))
    mask_spec = mask_spec or MaskSpec.from_dict(md.get("mask_spec"))
    static_mask = static_mask or (None if data else md.get("static_mask"))
    masks = _paired_masks(pf, heatmaps, data, static_mask) if data and not static_mask else None
    sm = StaticMask(static_mask) if static_mask else None
    md.update(stage="results", static_mask=static_mask, topk=topk, analyzed_with=__version__,
              mask_spec=mask_spec.to_dict())
    if data:
        md["masks_from"] = data
    schema = pf.schema_arrow.with_metadata({res.META_KEY: res.schema(None, md).metadata[res.META_KEY]})
    summary = RunSummary(out)
    dev = torch.device(device)
    with res.ResultsWriter(out, schema) as w, _progress(n, progress) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="camgate-mask") as pool:
        position = 0
        for batch in pf.iter_batches(batch_size=batch_size):  # the file is never held as Python rows
            rows = batch.to_pylist()
            for r in rows:
                r.setdefault("row", position)  # files from before `row` pair by position (and image)
                position += 1
                if static_mask:
                    r["mask"] = static_mask
                elif masks is not None:
                    r["mask"] = masks[r["row"]]
            _analyze_rows(rows, spec, mask_spec, sm, topk, dev, pool)
            w.write(rows)
            _count(summary, [r["status"] for r in rows])
            summary.computed += len(rows)
            bar.update(len(rows))
    summary.seconds = time.perf_counter() - t0
    return summary


def _paired_masks(pf, heatmaps: str, data: str, static_mask: str | None) -> dict[int, str | None]:
    """Mask URI per heatmap ``row`` from the manifest, after checking that row and image agree."""
    items = {it.index: it for it in load_items(data, static_mask)}  # a shard manifest keeps full-manifest rows
    have = pf.read(columns=[c for c in ("row", "image") if c in pf.schema_arrow.names]).to_pydict()
    rows = have.get("row") or list(range(len(have["image"])))  # files from before `row`: by position
    for r, image in zip(rows, have["image"]):
        if r not in items:
            raise DataError(f"data {data} has {len(items)} items but heatmaps {heatmaps} hold row {r}: "
                            f"not the manifest the heatmaps were computed from")
        if items[r].image != image:
            raise DataError(f"data {data} does not match heatmaps {heatmaps}: row {r} is {items[r].image} in the "
                            f"manifest but {image} in the heatmaps (reordered or another manifest?)")
    return {r: items[r].mask for r in rows}


def _mask_for(row: dict, spec: InputSpec, mask_spec: MaskSpec, sm) -> np.ndarray:
    """The invalid mask of the image region the model saw; ValueError/StorageError naming the problem."""
    from .data import decode_mask, model_view

    muri = row.get("mask")
    if not muri:
        raise ValueError("no mask (give a mask column, a masks/ folder or a static mask)")
    size = (row.get("image_width"), row.get("image_height"))
    full = sm.get(mask_spec, size) if sm else decode_mask(storage.read_bytes(muri), muri, mask_spec, size)
    return model_view(full, spec, size)


def _analyze_rows(rows, spec, mask_spec, sm, topk, dev, pool) -> None:
    todo = [(row, pool.submit(_mask_for, row, spec, mask_spec, sm))  # fetched in parallel
            for row in rows if row["status"] != "error" and row.get("cam") is not None]
    ready, cams, masks = [], [], []
    for row, fut in todo:
        try:
            masks.append(torch.from_numpy(fut.result()).to(dev))
        except (storage.StorageError, ValueError) as e:
            row.update(status="error", error=f"mask {row['mask']} (id {row['image_id']}): {e}",
                       error_kind=storage_error_kind(e))
            continue
        ready.append(row)
        cams.append(torch.from_numpy(res.cam_array(row)).to(dev))
    apply_metrics(ready, cams, masks, topk)


def run_layers(model: str | LoadedModel, data: str, out: str, *, layers: str | list[str] = "all",
               method: str = "gradcam", target: str | int = "predicted", static_mask: str | None = None,
               mask_spec: MaskSpec = MaskSpec(), batch_size: int = 8, device: str = "auto", workers: int = 4,
               topk: float = TOPK_DEFAULT, progress: bool = True, items: list[Item] | None = None) -> RunSummary:
    """Every selected layer's map for every image -> layers Parquet, one row per (image, layer).

    One forward and one backward per batch reach all layers (:mod:`camgate.cam.layers`); with masks,
    each row also gets the invalid-pixel metrics of its layer's map, so the file shows where in the
    network attention moves onto invalid pixels. The layer plan (and every skipped module with its
    reason) is fixed by one dry forward before any data is read, and recorded in the file's metadata.
    """
    from .cam.layers import plan_layers

    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    check_topk(topk)
    method = canonical(method)
    if lm.model is None:
        raise MethodError(f"maps of every layer need the model's layers, but model card {lm.card.name!r} is "
                          f"kind {lm.card.kind!r}, a black box")
    if method not in NATIVE:
        raise MethodError(f"all-layer maps take a native method {sorted(NATIVE)}; {method!r} runs one layer "
                          f"per pass through pytorch-grad-cam")
    target = parse_target(target, lm.card.num_classes)
    plan = plan_layers(lm.model, torch.zeros(1, 3, *lm.input.size, device=lm.device), layers)
    if not plan.layers:
        raise ConfigError(f"no module of {lm.card.name} gives a spatial map: nothing to show per layer")
    items = items if items is not None else load_items(data, static_mask)
    with_masks = any(it.mask for it in items)
    md = {"camgate_version": __version__, "stage": "layers", "model": lm.metadata(),
          "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256, "method": method,
          "target": str(target), "layers": plan.names(),
          "skipped_layers": [{"layer": n, "reason": why} for n, why in plan.skipped],
          "data": data, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk}
    summary = RunSummary(out)
    sm = StaticMask(static_mask) if static_mask else None
    with res.ResultsWriter(out, res.schema(None, md, res.LAYER_FIELDS)) as w, _progress(len(items), progress) as bar:
        loaders, overlap = gpu.cpu_budget(workers, lm.device)
        for batch in iter_batches(items, lm.input, mask_spec, batch_size, workers=loaders, static_mask=sm,
                                  with_masks=with_masks, overlap=overlap):
            rows = _layer_rows(lm, plan, method, target, batch, topk, with_masks)
            w.write(rows)
            _count(summary, [r["status"] for r in rows])
            summary.computed += len(batch)
            bar.update(len(batch))
    summary.seconds = time.perf_counter() - t0
    return summary


def _layer_rows(lm: LoadedModel, plan, method: str, target, batch: list[Sample], topk: float,
                with_masks: bool) -> list[dict]:
    from .cam.layers import layer_maps

    def base(s: Sample, ref) -> dict:
        row = {"row": s.item.index, "image_id": s.item.image_id, "image": s.item.image, "mask": s.item.mask,
               "layer": ref.label, "layer_index": ref.index, "status": "error"}
        if s.size:
            row["image_width"], row["image_height"] = s.size
        return row

    def compute(idx: list[int], targets: list[int]) -> None:
        samples = [batch[i] for i in idx]
        dev = lm.device
        lmaps = layer_maps(lm.model, torch.stack([s.x for s in samples]).to(dev), plan, method,
                           torch.tensor(targets, device=dev))
        pred, tgt = lmaps.logits.argmax(1).tolist(), lmaps.targets.tolist()
        finite = torch.isfinite(lmaps.logits).all(1).tolist()
        rows = []
        for ref, m in zip(plan.layers, lmaps.maps):
            m = m.float()
            host, ok = m.cpu(), torch.isfinite(m).flatten(1).all(1).tolist()
            good, cams, masks = [], [], []
            for i, s in enumerate(samples):
                r = base(s, ref)
                rows.append(r)
                if not (finite[i] and ok[i]):
                    r.update(error_kind="model", error=f"image {s.item.image} (id {s.item.image_id}): "
                                                       f"the model produced NaN/Inf (outputs or heatmap)")
                    continue
                r.update(status="ok", predicted_class=pred[i], target_class=tgt[i], cam_height=m.shape[1],
                         cam_width=m.shape[2], cam=res.cam_bytes(host[i]))
                if with_masks:
                    good.append(r)
                    cams.append(m[i])
                    masks.append(s.mask.to(dev))
            apply_metrics(good, cams, masks, topk)
        out.extend(rows)

    def fail(i: int, e: Exception) -> None:
        s = batch[i]
        out.extend({**base(s, ref), "error_kind": "model", "error": f"image {s.item.image} "
                    f"(id {s.item.image_id}): {type(e).__name__}: {e}"} for ref in plan.layers)

    out: list[dict] = []
    todo, targets, failed = triage(batch, target, lm.card, with_masks)
    for i, (err, kind) in failed.items():
        out.extend({**base(batch[i], ref), "error": err, "error_kind": kind} for ref in plan.layers)
    guarded(compute, todo, targets, fail)
    return sorted(out, key=lambda r: (r["row"], r["layer_index"]))


def run_road(model: str | LoadedModel, data: str, out: str, *, method: str = "gradcam", layers: str = "final",
             percentiles=None, sample: int = 0, seed: int = 0, target: str | int = "predicted",
             batch_size: int = 8, device: str = "auto", workers: int = 4, progress: bool = True) -> RunSummary:
    """ROAD faithfulness of the maps (:mod:`camgate.faithfulness`) -> ROAD Parquet, one row per (image, layer).

    ``layers``: ``final`` (the card's target layer, the maps the gate judges), ``all``, or names as
    for :func:`run_layers`. ``sample`` > 0 scores a seeded random sample of that many items (in
    manifest order). Each image's noise is seeded by ``seed`` and its ``row``, so a score does not
    depend on the sample or the batch. With several layers the metadata holds the ybROAD summary
    (per-layer mean ROAD: ``ybroad_max``, ``ybroad_mean``, ``best_layer``, ``curve``)."""
    import random

    from . import faithfulness as fa
    from .cam.layers import plan_layers

    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    percentiles = tuple(percentiles or fa.PERCENTILES)
    fa.check_percentiles(percentiles, lm.input.size)
    target = parse_target(target, lm.card.num_classes)
    if layers == "final":
        engine = CamEngine(lm.model, lm.layers(), method, lm.reshape_transform)
        names = [",".join(lm.target_layers)]
    else:
        engine = None
        method = canonical(method)
        if method not in NATIVE:
            raise MethodError(f"ROAD over several layers takes a native method {sorted(NATIVE)}, got {method!r}")
        plan = plan_layers(lm.model, torch.zeros(1, 3, *lm.input.size, device=lm.device), layers)
        names = plan.names()
    items = load_items(data)
    if sample and sample < len(items):
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), sample))]
    dev = lm.device
    mean = torch.tensor(lm.input.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(lm.input.std, device=dev).view(1, 3, 1, 1)

    def predict(x01: torch.Tensor) -> torch.Tensor:  # ROAD imputes in [0, 1] pixel space
        return torch.softmax(lm.model((x01 - mean) / std).float(), 1)

    md = {"camgate_version": __version__, "stage": "road", "model": lm.metadata(),
          "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256,
          "method": engine.method if engine else method, "layers": names, "percentiles": list(percentiles),
          "sample": sample, "seed": seed, "data": data, "target": str(target)}
    fields = res.road_fields(percentiles)
    per_layer: dict[str, list[float]] = {n: [] for n in names}
    summary = RunSummary(out)
    rows_all: list[dict] = []
    with _progress(len(items), progress) as bar:
        loaders, overlap = gpu.cpu_budget(workers, lm.device)
        for batch in iter_batches(items, lm.input, MaskSpec(), batch_size, workers=loaders, with_masks=False,
                                  overlap=overlap):
            rows_all += _road_rows(lm, batch, names, target, engine, plan if engine is None else None, method,
                                   predict, mean, std, percentiles, seed, per_layer)
            summary.computed += len(batch)
            bar.update(len(batch))
    if len(names) > 1:
        md["ybroad"] = fa.ybroad([(n, float(np.nanmean(v)) if np.isfinite(v).any() else math.nan)
                                  for n, v in ((n, np.array(per_layer[n], dtype=float)) for n in names)])
    with res.ResultsWriter(out, res.schema(None, md, fields)) as w:
        w.write(rows_all)
    _count(summary, [r["status"] for r in rows_all])
    summary.seconds = time.perf_counter() - t0
    return summary


def _road_rows(lm, batch, names, target, engine, plan, method, predict, mean, std, percentiles, seed,
               per_layer) -> list[dict]:
    from . import faithfulness as fa
    from .cam.layers import layer_maps

    def base(s, j):
        return {"row": s.item.index, "image_id": s.item.image_id, "image": s.item.image, "layer": names[j],
                "layer_index": j, "status": "error"}

    rows = []
    todo, targets, failed = triage(batch, target, lm.card, need_mask=False)
    for i, (err, kind) in failed.items():
        rows += [{**base(batch[i], j), "error": err, "error_kind": kind} for j in range(len(names))]
    good = [batch[i] for i in todo]
    if good:
        dev = lm.device
        x = torch.stack([s.x for s in good]).to(dev)
        t = torch.tensor(targets, device=dev)
        if engine is not None:
            cb = engine(x, t)
            maps, explained = [cb.cams], cb.targets
        else:
            lmaps = layer_maps(lm.model, x, plan, method, t)
            maps, explained = lmaps.maps, lmaps.targets
        seeds = torch.tensor([row_seed(seed, s.item.index) for s in good])
        for j, m in enumerate(maps):
            scored = fa.road(predict, x * std + mean, m.float(), explained, percentiles, seed=seeds).rows()
            for s, r, tc in zip(good, scored, explained.tolist()):
                row = {**base(s, j), "target_class": tc, "clean_probability": r["clean"], "road": r["road"],
                       "road_random": r["road_random"]}
                for q, p in enumerate(percentiles):
                    row[f"road_morf_p{int(p):02d}"], row[f"road_lerf_p{int(p):02d}"] = r["morf"][q], r["lerf"][q]
                if r["reason"]:  # an all-zero or non-finite map: nothing to rank, ROAD is NaN
                    row.update(status="no_activation", error=f"image {s.item.image} (id {s.item.image_id}): "
                                                             f"{r['reason']}")
                else:
                    row["status"] = "ok"
                    per_layer[names[j]].append(r["road"])
                rows.append(row)
    return sorted(rows, key=lambda r: (r["row"], r["layer_index"]))
