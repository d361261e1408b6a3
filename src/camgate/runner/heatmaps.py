"""``camgate run``: model card + data -> maps (and, with masks, metrics) -> results Parquet.

With ``analyze=False`` it writes the heatmaps only (predictions + raw maps, no masks needed) and
:func:`camgate.runner.analyze` later turns such a file plus masks into results: the two halves the
KFP pipeline runs as separate tasks.
"""
from __future__ import annotations

import logging
import time

import torch

from .. import __version__
from ..cam import CamEngine, MethodError, canonical
from ..data import device as gpu
from ..data.batches import iter_batches
from ..data.decode import MaskSpec, Sample, StaticMask
from ..data.manifest import Item, load_items, no_masks
from ..errors import ConfigError
from ..io import results as res
from ..io import storage
from ..metrics.invalid import check_topk
from ..model.load import LoadedModel, load_model
from ..settings import default
from .common import RunSummary, apply_metrics, count_statuses, guarded, parse_target, progress_bar, row_seed, triage
from .identity import DataFingerprint, fingerprint, provenance, run_identity

log = logging.getLogger(__name__)


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
            from ..cam import blackbox

            seeds = [row_seed(self.seed, r) for r in rows]
            return blackbox.explain(self.backend, x, self.method, targets, budget=self.budget, seeds=seeds)

        def close(self):
            pass

    def __init__(self, lm: LoadedModel, method: str = default("method"), target: str | int = default("target"),
                 analyze: bool = True, topk: float = default("topk"), meta_types: dict | None = None,
                 budget: int = default("budget"), seed: int = default("seed"), amp: str = default("amp"),
                 max_batch: int = 1 << 30):
        from ..cam import BLACKBOX
        from ..model.backends import TorchBackend

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
        row["image_sha256"], row["mask_sha256"] = s.image_sha256, s.mask_sha256
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


def run(model: str | LoadedModel, data: str, out: str, *, method: str = default("method"),
        target: str | int = default("target"), target_layer: str | list[str] | None = None,
        static_mask: str | None = None, mask_spec: MaskSpec = MaskSpec(),
        batch_size: int | str = default("batch_size"), device: str = default("device"),
        workers: int = default("workers"), topk: float = default("topk"), analyze: bool = True,
        policy: str | None = None, progress: bool = True, checkpoint_rows: int = default("checkpoint_rows"),
        checkpoint: str | None = None, budget: int = default("budget"), seed: int = default("seed"),
        amp: str = default("amp"), decode: str = default("decode")) -> RunSummary:
    """The heatmap test step. Raises (before any compute) only for problems of the whole run.

    With ``analyze=False`` only predictions and maps are computed (masks are not read; their URIs and
    the static mask stay in the file for :func:`analyze`). Rows are committed every
    ``checkpoint_rows`` rows under ``checkpoint`` (default ``<out>.parts``); re-running the same
    command after a crash resumes from there and computes again only the rows that are missing or
    failed on the storage service (see :class:`camgate.io.results.ResultsWriter`). ``budget`` and ``seed``:
    forward passes per image and the base seed of the black-box methods (decam, rise).

    Device path (:mod:`camgate.data.device`): ``amp`` ``off|bf16|fp16`` runs the model's forward and backward
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
    if analyze and not static_mask and items and not any(it.mask for it in items):
        raise no_masks(data)  # before any compute: every row would be the same error
    runner.meta_types = meta_cols = res.meta_types(it.meta for it in items)
    sm = StaticMask(static_mask) if (static_mask and analyze) else None
    md = {"camgate_version": __version__, "stage": "results" if analyze else "heatmaps",
          "model": lm.metadata(), "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256,
          "method": runner.engine.method, "target": str(runner.target),
          "target_layer": [] if runner.black_box else lm.target_layers,
          **({"budget": budget, "seed": seed} if runner.black_box else {}),
          "data": data, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk, "policy": policy,
          "policy_sha256": storage.sha256_or_none(policy), "amp": amp, "jpeg_decode": "gpu" if gpu_jpeg else "cpu"}
    ident = run_identity(lm, method=runner.engine.method, target=runner.target, layers=md["target_layer"],
                         static_mask=static_mask if analyze else None, mask_spec=mask_spec if analyze else None,
                         topk=topk if analyze else None, budget=budget if runner.black_box else None,
                         seed=seed if runner.black_box else None)
    schema = res.schema(meta_cols, {**md, res.IDENTITY_KEY: ident, **provenance(lm, data)})
    summary = RunSummary(out)
    # full-precision CPU-decoded runs keep the fingerprint they had before these keys: they resume
    same = {k: v for k, v in md.items() if (k, v) not in (("amp", "off"), ("jpeg_decode", "cpu"))}

    def batches(todo: list[Item]):
        return gpu.prefetch(iter_batches(todo, lm.input, mask_spec, batch_size, workers=loaders, static_mask=sm,
                                         with_masks=analyze, overlap=overlap, defer_jpeg=gpu_jpeg),
                            dev, lm.input)

    with res.ResultsWriter(out, schema, checkpoint_rows, fingerprint(same, items), checkpoint,
                           tracker=DataFingerprint(ident)) as w, \
            progress_bar(len(items), progress) as bar:
        # rows committed by an interrupted run of the same command are not computed again, except
        # those that failed on the storage service: that may have been a passing outage
        if w.retry:
            redo = [r for batch in batches([items[i] for i in w.retry]) for r in runner.process(batch)]
            w.replace(w.retry, redo)
            summary.computed += len(redo)
        count_statuses(summary, w.resumed_status)
        summary.resumed = w.resumed - len(w.retry)
        bar.update(w.resumed)
        for batch in batches(items[w.resumed:]):
            rows = runner.process(batch)
            w.write(rows)
            count_statuses(summary, [r["status"] for r in rows])
            summary.computed += len(rows)
            bar.update(len(rows))
    runner.engine.close()
    summary.storage_errors = w.storage_errors
    if w.storage_errors:
        log.warning("%d rows failed on the storage service; their committed parts are kept under %s: run the "
                    "same command again to retry just those rows", w.storage_errors, w.parts)
    summary.seconds = time.perf_counter() - t0
    return summary
