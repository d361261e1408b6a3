"""``camgate road``: ROAD faithfulness of the maps (:mod:`camgate.metrics.road`), one row per
(image, layer), with the ybROAD summary over several layers.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import torch

from .. import __version__
from ..cam import NATIVE, CamEngine, MethodError, canonical
from ..data import device as gpu
from ..data.batches import iter_batches
from ..data.decode import MaskSpec
from ..data.manifest import load_items
from ..errors import ConfigError
from ..io import results as res
from ..model.load import LoadedModel, load_model
from ..settings import default
from .common import (RunSummary, classifier_only, count_statuses, guarded, parse_target, progress_bar, row_seed,
                     triage)
from .identity import data_fingerprint, run_identity


def run_road(model: str | LoadedModel, data: str, out: str, *, method: str = default("method"),
             layers: str = default("layers", "road"), percentiles=None, sample: int = default("sample"),
             seed: int = default("seed"), target: str | int = default("target"),
             batch_size: int = default("batch_size", "road"), device: str = default("device"),
             workers: int = default("workers"), sanity: bool = default("sanity"),
             progress: bool = True) -> RunSummary:
    """ROAD faithfulness of the maps (:mod:`camgate.metrics.road`) -> ROAD Parquet, one row per (image, layer).

    ``layers``: ``final`` (the card's target layer, the maps the gate judges), ``all``, or names as
    for :func:`run_layers`. ``sample`` > 0 scores a seeded random sample of that many items (in
    manifest order). Each image's noise is seeded by ``seed`` and its ``row``, so a score does not
    depend on the sample or the batch. With several layers the metadata holds the ybROAD summary
    (per-layer mean ROAD: ``ybroad_max``, ``ybroad_mean``, ``best_layer``, ``curve``).

    ``sanity``: also the sanity checks of the same maps (:class:`camgate.metrics.sanity.SanityChecks`:
    similarity to the map of the fully randomised model and to the map of a seeded other class), as
    columns of the same rows: one faithfulness file. Only for the maps the gate judges (``final``)."""
    import random

    from ..cam.layers import plan_layers
    from ..metrics import road as fa

    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    classifier_only(lm, "ROAD (camgate road)")
    percentiles = tuple(percentiles or fa.PERCENTILES)
    fa.check_percentiles(percentiles, lm.input.size)
    target = parse_target(target, lm.card.num_classes)
    if sanity and layers != "final":
        raise ConfigError(f"the sanity checks score the maps the gate judges: use layers 'final', got {layers!r}")
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
    checks = None
    if sanity:
        from ..metrics.sanity import SanityChecks

        if lm.card.num_classes < 2:
            raise ConfigError("the random-logit check needs a model with at least two classes")
        checks = SanityChecks(engine, lm.card.num_classes, seed)
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
          "layer_aliases": {} if engine else plan.aliases(),
          "sample": sample, "seed": seed, "data": data, "target": str(target),
          "sanity": checks.describe() if checks else None}
    fields = res.road_fields(percentiles, sanity=bool(checks))
    per_layer: dict[str, list[float]] = {n: [] for n in names}
    summary = RunSummary(out)
    rows_all: list[dict] = []
    with progress_bar(len(items), progress) as bar:
        loaders, overlap = gpu.cpu_budget(workers, lm.device)
        for batch in iter_batches(items, lm.input, MaskSpec(), batch_size, workers=loaders, with_masks=False,
                                  overlap=overlap):
            rows_all += _road_rows(lm, batch, names, target, engine, plan if engine is None else None, method,
                                   predict, mean, std, percentiles, seed, per_layer, checks)
            summary.computed += len(batch)
            bar.update(len(batch))
    if checks:
        checks.close()
    # the maps it scored: a gate takes ROAD scores only for a run of the same model, method, layer and images
    ident = run_identity(lm, method=md["method"], target=target, layers=names,
                         road={"percentiles": list(percentiles), "sample": sample, "seed": seed,
                               "sanity": bool(checks)})
    ident["data"] = data_fingerprint([pa.Table.from_pylist(rows_all, schema=pa.schema(fields))])
    md[res.IDENTITY_KEY] = ident
    if len(names) > 1:
        md["ybroad"] = fa.ybroad([(n, float(np.nanmean(v)) if np.isfinite(v).any() else math.nan)
                                  for n, v in ((n, np.array(per_layer[n], dtype=float)) for n in names)])
    with res.ResultsWriter(out, res.schema(None, md, fields)) as w:
        w.write(rows_all)
    count_statuses(summary, [r["status"] for r in rows_all])
    summary.seconds = time.perf_counter() - t0
    return summary


def _road_rows(lm, batch, names, target, engine, plan, method, predict, mean, std, percentiles, seed,
               per_layer, checks=None) -> list[dict]:
    from ..cam.layers import layer_maps
    from ..metrics import road as fa

    def base(s, j):
        return {"row": s.item.index, "image_id": s.item.image_id, "image": s.item.image, "layer": names[j],
                "layer_index": j, "status": "error", "image_sha256": s.image_sha256}

    rows = []
    todo, targets, failed = triage(batch, target, lm.card, need_mask=False)
    for i, (err, kind) in failed.items():
        rows += [{**base(batch[i], j), "error": err, "error_kind": kind} for j in range(len(names))]

    def compute(idx: list[int], tgts: list[int]) -> None:
        good = [batch[i] for i in idx]
        dev = lm.device
        x = torch.stack([s.x for s in good]).to(dev)
        t = torch.tensor(tgts, device=dev)
        if engine is not None:
            cb = engine(x, t)
            maps, explained = [cb.cams], cb.targets
        else:
            lmaps = layer_maps(lm.model, x, plan, method, t)
            maps, explained = lmaps.maps, lmaps.targets
        seeds = torch.tensor([row_seed(seed, s.item.index) for s in good])
        sane = ({k: v.tolist() for k, v in checks(x, maps[0], explained, [s.item.index for s in good]).items()}
                if checks else {})
        done, scores = [], []  # kept only if every layer of these images is scored
        for j, m in enumerate(maps):
            scored = fa.road(predict, x * std + mean, m.float(), explained, percentiles, seed=seeds).rows()
            for i, (s, r, tc) in enumerate(zip(good, scored, explained.tolist())):
                row = {**base(s, j), "target_class": tc, "clean_probability": r["clean"], "road": r["road"],
                       "road_random": r["road_random"]}
                for q, p in enumerate(percentiles):
                    row[f"road_morf_p{int(p):02d}"], row[f"road_lerf_p{int(p):02d}"] = r["morf"][q], r["lerf"][q]
                if r["reason"]:  # an all-zero or non-finite map: nothing to rank, ROAD is NaN
                    row.update(status="no_activation", error=f"image {s.item.image} (id {s.item.image_id}): "
                                                             f"{r['reason']}")
                else:
                    row["status"] = "ok"
                    row.update({k: v[i] for k, v in sane.items()})
                    scores.append((names[j], r["road"]))
                done.append(row)
        rows.extend(done)
        for name, score in scores:
            per_layer[name].append(score)

    def fail(i: int, e: Exception) -> None:  # the model raised on this image: its rows say so, the rest go on
        s = batch[i]
        rows.extend({**base(s, j), "error_kind": "model", "error": f"image {s.item.image} (id {s.item.image_id}): "
                     f"{type(e).__name__}: {e}"} for j in range(len(names)))

    guarded(compute, todo, targets, fail)
    return sorted(rows, key=lambda r: (r["row"], r["layer_index"]))
