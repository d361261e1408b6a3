"""``camgate layers``: every selected layer's map for every image, one row per (image, layer)."""
from __future__ import annotations

import time

import torch

from .. import __version__
from ..cam import NATIVE, MethodError, canonical
from ..data import device as gpu
from ..data.batches import iter_batches
from ..data.decode import MaskSpec, Sample, StaticMask
from ..data.manifest import Item, load_items
from ..errors import ConfigError
from ..io import results as res
from ..metrics.invalid import check_topk
from ..model.load import LoadedModel, load_model
from ..settings import default
from .common import (RunSummary, apply_metrics, classifier_only, count_statuses, guarded, parse_target, progress_bar,
                     triage)
from .identity import DataFingerprint, run_identity


def run_layers(model: str | LoadedModel, data: str, out: str, *, layers: str | list[str] = default("layers"),
               method: str = default("method"), target: str | int = default("target"),
               static_mask: str | None = None, mask_spec: MaskSpec = MaskSpec(),
               batch_size: int = default("batch_size", "layers"), device: str = default("device"),
               workers: int = default("workers"), topk: float = default("topk"), progress: bool = True,
               items: list[Item] | None = None) -> RunSummary:
    """Every selected layer's map for every image -> layers Parquet, one row per (image, layer).

    One forward and one backward per batch reach all layers (:mod:`camgate.cam.layers`); with masks,
    each row also gets the invalid-pixel metrics of its layer's map, so the file shows where in the
    network attention moves onto invalid pixels. The layer plan (and every skipped module with its
    reason) is fixed by one dry forward before any data is read, and recorded in the file's metadata.
    """
    from ..cam.layers import plan_layers

    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    classifier_only(lm, "maps of every layer (camgate layers, animate)")
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
          "target": str(target), "layers": plan.names(), "layer_aliases": plan.aliases(),
          "skipped_layers": [{"layer": n, "reason": why} for n, why in plan.skipped],
          "data": data, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk}
    ident = run_identity(lm, method=method, target=target, layers=plan.names(),
                         static_mask=static_mask if with_masks else None, mask_spec=mask_spec if with_masks else None,
                         topk=topk if with_masks else None)
    md[res.IDENTITY_KEY] = ident
    summary = RunSummary(out)
    sm = StaticMask(static_mask) if static_mask else None
    with res.ResultsWriter(out, res.schema(None, md, res.LAYER_FIELDS), tracker=DataFingerprint(ident)) as w, \
            progress_bar(len(items), progress) as bar:
        loaders, overlap = gpu.cpu_budget(workers, lm.device)
        for batch in iter_batches(items, lm.input, mask_spec, batch_size, workers=loaders, static_mask=sm,
                                  with_masks=with_masks, overlap=overlap):
            rows = _layer_rows(lm, plan, method, target, batch, topk, with_masks)
            w.write(rows)
            count_statuses(summary, [r["status"] for r in rows])
            summary.computed += len(batch)
            bar.update(len(batch))
    summary.seconds = time.perf_counter() - t0
    return summary


def _layer_rows(lm: LoadedModel, plan, method: str, target, batch: list[Sample], topk: float,
                with_masks: bool) -> list[dict]:
    from ..cam.layers import layer_maps

    def base(s: Sample, ref) -> dict:
        row = {"row": s.item.index, "image_id": s.item.image_id, "image": s.item.image, "mask": s.item.mask,
               "layer": ref.label, "layer_index": ref.index, "status": "error", "image_sha256": s.image_sha256,
               "mask_sha256": s.mask_sha256}
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
