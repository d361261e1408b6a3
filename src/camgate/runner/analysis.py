"""``camgate analyze``: a heatmaps file + masks -> results, pairing masks with maps by ``row`` and
``image``, never by position alone.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from .. import __version__
from ..data.decode import MaskSpec, StaticMask, storage_error_kind
from ..data.geometry import InputSpec
from ..data.manifest import DataError, load_items, no_masks
from ..io import results as res
from ..io import storage
from ..metrics.invalid import check_topk
from ..settings import default
from .common import RunSummary, apply_metrics, count_statuses, progress_bar
from .identity import DataFingerprint, with_masks


def analyze(heatmaps: str, out: str, *, data: str | None = None, static_mask: str | None = None,
            mask_spec: MaskSpec | None = None, input_spec: InputSpec | None = None,
            topk: float = default("topk"), batch_size: int = 64, device: str = "cpu",
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
    if not static_mask and n:
        named = masks.values() if masks is not None else (
            pf.read(columns=["mask"]).column("mask").to_pylist() if "mask" in pf.schema_arrow.names else [])
        if not any(named):
            raise no_masks(data or heatmaps)
    sm = StaticMask(static_mask) if static_mask else None
    # the heatmaps' identity (model, method, target, layer) carried over, with the masks read here
    ident = with_masks(res.file_identity(md), static_mask=static_mask, mask_spec=mask_spec, topk=topk)
    md.update(stage="results", static_mask=static_mask, topk=topk, analyzed_with=__version__,
              mask_spec=mask_spec.to_dict())
    md[res.IDENTITY_KEY] = ident
    if data:
        md["masks_from"] = data
    sch = pf.schema_arrow
    for name, typ in res.FIELDS:  # heatmaps files from before the content hashes get their columns
        if name in ("image_sha256", "mask_sha256") and name not in sch.names:
            sch = sch.append(pa.field(name, typ))
    schema = sch.with_metadata({res.META_KEY: res.schema(None, md).metadata[res.META_KEY]})
    summary = RunSummary(out)
    dev = torch.device(device)
    with res.ResultsWriter(out, schema, tracker=DataFingerprint(ident)) as w, progress_bar(n, progress) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="camgate-mask") as pool:
        position = 0
        for batch in pf.iter_batches(batch_size=batch_size):  # the file is never held as Python rows
            rows = batch.to_pylist()
            for r in rows:
                r.setdefault("row", position)  # files from before `row` pair by position (and image)
                r["mask_sha256"] = None  # the masks are read here: set for each mask that is
                position += 1
                if static_mask:
                    r["mask"] = static_mask
                elif masks is not None:
                    r["mask"] = masks[r["row"]]
            _analyze_rows(rows, spec, mask_spec, sm, topk, dev, pool)
            w.write(rows)
            count_statuses(summary, [r["status"] for r in rows])
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


def _mask_for(row: dict, spec: InputSpec, mask_spec: MaskSpec, sm) -> tuple[np.ndarray, str]:
    """The invalid mask of the image region the model saw and the sha256 of the mask's bytes;
    ValueError/StorageError naming the problem."""
    from ..data.decode import decode_mask, model_view

    muri = row.get("mask")
    if not muri:
        raise ValueError("no mask (give a mask column, a masks/ folder or a static mask)")
    size = (row.get("image_width"), row.get("image_height"))
    if sm:
        return model_view(sm.get(mask_spec, size), spec, size), sm.sha256()
    raw = storage.read_bytes(muri)
    return model_view(decode_mask(raw, muri, mask_spec, size), spec, size), storage.sha256_bytes(raw)


def _analyze_rows(rows, spec, mask_spec, sm, topk, dev, pool) -> None:
    todo = [(row, pool.submit(_mask_for, row, spec, mask_spec, sm))  # fetched in parallel
            for row in rows if row["status"] != "error" and row.get("cam") is not None]
    from ..io.results import region_array

    ready, cams, masks, boxes, regions = [], [], [], [], []
    for row, fut in todo:
        try:
            mask, row["mask_sha256"] = fut.result()
            masks.append(torch.from_numpy(mask).to(dev))
        except (storage.StorageError, ValueError) as e:
            row.update(status="error", error=f"mask {row['mask']} (id {row['image_id']}): {e}",
                       error_kind=storage_error_kind(e))
            continue
        ready.append(row)
        cams.append(torch.from_numpy(res.cam_array(row)).to(dev))
        if row.get("box_x1") is not None:  # a detection: its box in the mask's pixels
            boxes.append(spec.box_to_region(tuple(row[c] for c in res.BOX_COLUMNS),
                                            (row["image_width"], row["image_height"])))
        if row.get("region") is not None:  # a segmentation class: its region as run stored it
            regions.append(torch.from_numpy(region_array(row)).to(dev))
    apply_metrics(ready, cams, masks, topk, boxes if boxes else None, regions if regions else None)
