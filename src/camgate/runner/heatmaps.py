"""``camgate run``: model card + data -> maps (and, with masks, metrics) -> results Parquet.

With ``analyze=False`` it writes the heatmaps only (predictions + raw maps, no masks needed) and
:func:`camgate.runner.analyze` later turns such a file plus masks into results: the two halves the
KFP pipeline runs as separate tasks.
"""
from __future__ import annotations

import logging
import time

from .. import __version__
from ..data import device as gpu
from ..data.batches import iter_batches
from ..data.decode import MaskSpec, StaticMask
from ..data.manifest import Item, load_items, no_masks
from ..errors import ConfigError
from ..io import results as res
from ..io import storage
from ..metrics.invalid import check_topk
from ..model.load import LoadedModel, load_model
from ..settings import default
from .classifier import Runner
from .common import RunSummary, count_statuses, progress_bar
from .detection import DetectionRunner
from .segmentation import MultiLabelRunner, SegmentationRunner
from .identity import DataFingerprint, fingerprint, provenance, run_identity

log = logging.getLogger(__name__)


def make_runner(lm: LoadedModel, method: str, target, analyze: bool, topk: float, *, budget: int, seed: int,
                amp: str, score_threshold: float = default("score_threshold"), annotations: str | None = None,
                classes: str | list | None = None) -> Runner:
    """The runner of the model card's task, its settings checked (before any data is read)."""
    task = lm.card.task
    if task == "detection" and str(target) != default("target"):
        raise ConfigError(f"target {target!r} does not apply to a detector: its detections are explained "
                          f"(--score-threshold, or ground-truth boxes)")
    if task != "detection" and annotations:
        raise ConfigError(f"annotations (COCO boxes) apply to detectors only; model card {lm.card.name!r} is {task}")
    if lm.card.detection:
        return DetectionRunner(lm, method, analyze, topk, budget=budget, seed=seed, amp=amp,
                               score_threshold=score_threshold, annotations=annotations)
    if task in ("segmentation", "multilabel"):
        cls = SegmentationRunner if task == "segmentation" else MultiLabelRunner
        return cls(lm, method, analyze, topk, budget=budget, seed=seed, amp=amp, classes=classes,
                   score_threshold=score_threshold, target=target)
    if classes:
        raise ConfigError(f"classes apply to segmentation and multi-label models; model card {lm.card.name!r} "
                          f"is a {task} model: use target")
    return Runner(lm, method, target, analyze, topk, budget=budget, seed=seed, amp=amp)


def run(model: str | LoadedModel, data: str, out: str, *, method: str = default("method"),
        target: str | int = default("target"), target_layer: str | list[str] | None = None,
        static_mask: str | None = None, mask_spec: MaskSpec = MaskSpec(),
        batch_size: int | str = default("batch_size"), device: str = default("device"),
        workers: int = default("workers"), topk: float = default("topk"), analyze: bool = True,
        policy: str | None = None, progress: bool = True, checkpoint_rows: int = default("checkpoint_rows"),
        checkpoint: str | None = None, budget: int = default("budget"), seed: int = default("seed"),
        amp: str = default("amp"), decode: str = default("decode"),
        score_threshold: float = default("score_threshold"), annotations: str | None = None,
        classes: str | list | None = None) -> RunSummary:
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
    On CUDA, conv models run in channels_last (the model passed in is converted in place).

    Detectors (model card ``task: detection``, :mod:`camgate.runner.detection`): one row per explained
    detection (``score_threshold``, ground truth from the manifest's ``boxes`` column or the COCO
    ``annotations`` file); ``target`` does not apply. Segmentation and multi-label models
    (:mod:`camgate.runner.segmentation`): one row per explained class (present in the prediction or in the
    manifest's ``regions`` label maps, or positive at ``score_threshold``; or the ``classes`` named:
    comma-separated ids or names; or, ``target='label'`` on a multi-label model, the manifest's labels)."""
    t0 = time.perf_counter()
    amp, decode, batch_size = gpu.check_amp(amp), gpu.check_decode(decode), gpu.parse_batch_size(batch_size)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, target_layer=target_layer)
    task = lm.card.task
    runner = make_runner(lm, method, target, analyze, topk, budget=budget, seed=seed, amp=amp,
                         score_threshold=score_threshold, annotations=annotations, classes=classes)
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
    if any(it.regions for it in items):  # ground-truth label maps: the regions segmentation classes are explained on
        if task != "segmentation":
            raise ConfigError(f"data {data} has a regions column (ground-truth label maps), which applies to "
                              f"segmentation models; model card {lm.card.name!r} is task {task}")
        runner.ground_truth = True
    runner.meta_types = meta_cols = res.meta_types(it.meta for it in items)
    sm = StaticMask(static_mask) if (static_mask and analyze) else None
    md = {"camgate_version": __version__, "stage": "results" if analyze else "heatmaps",
          "model": lm.metadata(), "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256,
          "method": runner.engine.method, "target": str(runner.target),
          "target_layer": [] if runner.black_box else lm.target_layers,
          **({"budget": budget, "seed": seed} if runner.black_box else {}),
          "data": data, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk, "policy": policy,
          "policy_sha256": storage.sha256_or_none(policy), "amp": amp, "jpeg_decode": "gpu" if gpu_jpeg else "cpu"}
    detect = {}  # what a detector's rows also depend on: which detections were explained
    if lm.card.detection:
        detect = {"score_threshold": runner.score_threshold, "annotations": annotations,
                  "annotations_sha256": storage.sha256_or_none(annotations) if annotations else None}
        md.update(detect)
    elif task in ("segmentation", "multilabel"):  # which classes were explained
        detect = {"classes": runner.classes}
        if task == "segmentation":  # each class's region: its predicted pixels or its ground-truth ones
            detect["regions"] = "ground_truth" if runner.ground_truth else "predicted"
        elif runner.classes is None and runner.target != "label":
            detect["score_threshold"] = runner.score_threshold
        md.update(detect)
    ident = run_identity(lm, method=runner.engine.method, target=runner.target, layers=md["target_layer"],
                         static_mask=static_mask if analyze else None, mask_spec=mask_spec if analyze else None,
                         topk=topk if analyze else None, budget=budget if runner.black_box else None,
                         seed=seed if runner.black_box else None,
                         **{k: v for k, v in detect.items() if k != "annotations"})
    schema = res.schema(meta_cols, {**md, res.IDENTITY_KEY: ident, **provenance(lm, data)},
                        res.task_fields(lm.card.task))
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
            redo: dict[int, list[dict]] = {}  # an item's rows (a detector's image: one per detection)
            for batch in batches([items[i] for i in w.retry]):
                for r in runner.process(batch):
                    redo.setdefault(r["row"], []).append(r)
            w.replace(w.retry, [redo[items[i].index] for i in w.retry])
            summary.computed += sum(map(len, redo.values()))
        count_statuses(summary, w.resumed_status)
        summary.resumed = len(w.resumed_status) - summary.computed  # rows kept as committed
        bar.update(w.resumed)
        for batch in batches(items[w.resumed:]):
            rows = runner.process(batch)
            w.write(rows)
            count_statuses(summary, [r["status"] for r in rows])
            summary.computed += len(rows)
            bar.update(len(batch))  # images
    runner.engine.close()
    summary.storage_errors = w.storage_errors
    if w.storage_errors:
        log.warning("%d rows failed on the storage service; their committed parts are kept under %s: run the "
                    "same command again to retry just those rows", w.storage_errors, w.parts)
    summary.seconds = time.perf_counter() - t0
    return summary
