"""The classifier's half of :func:`camgate.runner.run`: a batch of samples -> one row per image."""
from __future__ import annotations

import torch

from ..cam import CamEngine, MethodError, canonical
from ..cam.blackbox import check_budget
from ..data import device as gpu
from ..data.decode import Sample
from ..io import results as res
from ..model.load import LoadedModel
from ..settings import default
from .common import apply_metrics, guarded, parse_target, row_seed, triage


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

        self._setup(lm, analyze, topk, meta_types, amp, max_batch)
        if str(method).lower() == "drise":
            raise MethodError(f"drise explains object detectors (model card task: detection); model card "
                              f"{lm.card.name!r} is a classifier: use decam or rise")
        name = canonical(method)
        self.black_box = name in BLACKBOX
        if self.black_box:
            check_budget(budget)
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

    def _setup(self, lm: LoadedModel, analyze: bool, topk: float, meta_types: dict | None, amp: str,
               max_batch: int, batched: bool = True) -> None:
        """What every runner holds: the model, the analysis settings, the precision, the batch splitter and
        the inputs' memory format."""
        self.lm, self.analyze, self.topk = lm, analyze, topk
        self.amp = gpu.check_amp(amp)
        self.split = gpu.OomSplitter(max_batch)  # halves the compute batch on out-of-memory
        self.meta_types = meta_types or {}
        # conv models on CUDA run in channels_last (converted in place), and their inputs alike; a model
        # taking a list of images (``batched`` False: detectors) keeps its layout
        self.memory_format = torch.channels_last if (
            batched and lm.model is not None and gpu.channels_last(lm.model, lm.device)) else torch.contiguous_format

    @property
    def row_target(self):
        """What :func:`triage` takes each item's class from (runners choosing their own rows: 'predicted')."""
        return self.target

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
        todo, targets, failed = triage(batch, self.row_target, self.lm.card, self.analyze)
        for i, (err, kind) in failed.items():
            rows[i].update(error=err, error_kind=kind)

        def fail(i: int, e: Exception) -> None:
            rows[i].update(status="error", error_kind="model", error=f"image {batch[i].item.image} "
                           f"(id {batch[i].item.image_id}): {type(e).__name__}: {e}")

        self.split.run(lambda idx, ts: guarded(
            lambda i2, t2: self._compute([batch[i] for i in i2], [rows[i] for i in i2], t2), idx, ts, fail, oom=True),
            todo, targets, fail)
        # runners of several rows per image (detections, classes) leave them under `_objects`
        out = []
        for row in rows:
            objects = row.pop("_objects", None)
            out += [{**row, **o} for o in objects] if objects else [row]
        return out

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
