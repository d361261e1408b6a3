"""Data set -> items: manifests (CSV, JSONL, Parquet) and prefix data sets.

A data set is either a manifest (``.csv``, ``.jsonl``/``.ndjson`` or ``.parquet``) with columns
``image`` (required), ``mask``, ``label``, ``image_id`` (optional) and any other columns, which are
passed through as metadata (``boxes``: ground-truth boxes of detection data, kept raw here and parsed per
item by :func:`camgate.data.boxes.parse_boxes`; ``regions``: the URI of a segmentation ground-truth label
map, resolved like ``mask``; ``label`` of a multi-label data set: ``;``-separated ids or names); or a prefix
(``s3://bucket/set/`` or a local directory) holding
``images/`` and ``masks/`` whose files pair by their path below those folders without extension
(for a flat layout: the file stem).

Relative paths in a manifest resolve against the manifest's folder; a ``..`` that leaves that folder
is refused for that item only. A static mask (fixed camera) replaces per-item masks for every item.
A ``row`` column gives each item its row number in the full manifest (``Item.index``, the results'
``row``): what shard manifests (:mod:`camgate.runner.shards`) keep.

Problems of the whole run raise :class:`DataError`; problems of one item end up in that item's
``Item.error`` / ``Sample.error`` so the caller can write an error row and go on.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..io import storage

MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                    ".pq": "parquet"}
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(0|[1-9]\d*)?(\.\d+)?([eE][+-]?\d+)?")  # no leading zeros, no nan/inf
# Shard manifests (Parquet written by camgate.runner.shards.plan, marked by this stage in their metadata) hold
# items as loaded: URIs already resolved against the original manifest, and each item's known error here.
SHARD_STAGE = "shard"
SHARD_ERROR = "_item_error"
# the error of an item's own mask (a refused path, no or several masks of its stem), apart: a static mask
# given when the shard runs replaces that mask, and its error, as it does in a run over the original data
SHARD_MASK_ERROR = "_mask_error"
# columns that are item fields, not metadata (a shard manifest's own columns aside)
RESERVED_COLUMNS = ("image", "mask", "label", "image_id", "row", "boxes", "regions")


class DataError(ConfigError):
    """The data set as a whole is unusable (unreadable manifest, no ``image`` column, no items...)."""


def no_masks(data) -> DataError:
    """A run whose data names no mask for any image (and no static mask): a setting of the run to fix,
    not a fault of each image."""
    return DataError(f"data {data} names no mask for any image: give a mask column (or a masks/ folder beside "
                     f"images/), --static-mask for a fixed camera, or --heatmaps-only for maps without metrics")



@dataclass

class Item:
    """One manifest row (or one image of a prefix data set)."""

    index: int
    image_id: str
    image: str | None
    mask: str | None
    label: object | None
    meta: dict
    error: str | None = None  # known before loading: refused path, unsupported scheme, no mask...
    mask_error: str | None = None  # the part of ``error`` that is the mask's (a static mask makes it moot)
    boxes: object | None = None  # the raw ``boxes`` cell (JSON text or parsed list): see camgate.data.boxes
    regions: str | None = None  # URI of the ground-truth label map (segmentation): pixel = class id, 255 = void

    @property
    def image_error(self) -> str | None:
        """The item's error apart from its mask's: what stays when a static mask replaces the mask."""
        return None if self.error is not None and self.error == self.mask_error else self.error


# --- items -----------------------------------------------------------------------------------

def load_items(data: str, static_mask: str | None = None) -> list[Item]:
    """Manifest or prefix -> items in manifest order (prefix: sorted by path).

    Prefix data sets: ``image_id`` is the path below ``images/`` without extension (the stem for a
    flat layout) and an image without a mask of the same stem is an item error.

    With ``static_mask`` every item's ``mask`` is that URI, whatever the manifest says, and a
    prefix data set needs no ``masks/`` folder.
    """
    data = os.fspath(data)
    fmt = MANIFEST_FORMATS.get(posixpath.splitext(data.rstrip("/"))[1].lower())
    if fmt:
        items = _manifest_items(data, fmt, static_mask)
    elif storage.is_s3(data) or os.path.isdir(data):
        items = _prefix_items(data, static_mask)
    elif not os.path.exists(data):
        raise DataError(f"data {data} not found")
    else:
        raise DataError(f"data {data!r}: expected a manifest (.csv, .jsonl, .parquet) or a folder/prefix "
                        f"holding images/ and masks/")
    if not items:
        raise DataError(f"no items in data {data}")
    return items


def _manifest_items(uri: str, fmt: str, static_mask: str | None) -> list[Item]:
    try:
        raw = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise DataError(f"cannot read manifest {uri}: {e}") from e
    if not raw.strip():
        raise DataError(f"no items in data {uri}: the manifest is empty")
    try:
        columns, rows, md = _PARSERS[fmt](raw)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - csv/json/pyarrow each raise their own types
        raise DataError(f"manifest {uri} is not valid {fmt}: {e}") from e
    if not rows:
        raise DataError(f"no items in data {uri}: the manifest has no rows")
    if "image" not in columns:
        raise DataError(f"manifest {uri} has no column 'image' (columns: {columns})")
    shard = md.get("stage") == SHARD_STAGE
    reserved = set(RESERVED_COLUMNS) | ({SHARD_ERROR, SHARD_MASK_ERROR} if shard else set())
    items, seen = [], {}
    for i, row in enumerate(rows):
        index = _row_number(uri, row, i) if "row" in columns else i
        if seen.setdefault(index, i) != i:
            raise DataError(f"manifest {uri}: row number {index} appears twice (items {seen[index]} and {i})")
        if shard:  # resolved once, against the original manifest: taken as they are
            image, error = _cell(row.get("image")), _cell(row.get(SHARD_ERROR))
            mask, err = _cell(row.get("mask")), _cell(row.get(SHARD_MASK_ERROR))
            regions, regions_err = _cell(row.get("regions")), None
        else:
            image, error = _ref(uri, row.get("image"), "image")
            mask, err = _ref(uri, row.get("mask"), "mask")
            regions, regions_err = _ref(uri, row.get("regions"), "regions")
        if image is None and error is None:
            error = f"row {index}: empty 'image' cell"
        if static_mask:
            mask, err = static_mask, None
        else:
            error = error or err
        error = error or regions_err
        image_id = _cell(row.get("image_id"))
        if image_id is None:
            image_id = _stem(image or _cell(row.get("image")) or "") or f"row-{index}"
        items.append(Item(
            index=index, image_id=str(image_id), image=image, mask=mask,
            label=_label(row.get("label")),
            meta={k: _meta(row.get(k)) for k in columns if k not in reserved},
            error=error, mask_error=err, boxes=_cell(row.get("boxes")), regions=regions))
    return items


def _row_number(uri: str, row: dict, i: int) -> int:
    v = _cell(row.get("row"))
    try:
        n = int(v)
        ok = n >= 0 and float(v) == n and not isinstance(v, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"manifest {uri}: item {i}: column 'row' must be a row number (an integer >= 0), got {v!r}")
    return n


def _ref(manifest: str, value, what: str) -> tuple[str | None, str | None]:
    """A manifest cell -> (resolved URI, item error). Escaping ``..`` and odd schemes are item errors."""
    value = _cell(value)
    if value is None:
        return None, None
    value = str(value).strip()
    try:
        return storage.resolve(manifest, value), None
    except storage.StorageError as e:
        return value, f"{what} {value}: refused: {e}"


def _prefix_items(prefix: str, static_mask: str | None) -> list[Item]:
    images_at = storage.join(prefix, "images")
    try:
        images = _image_files(storage.list_uris(images_at))
        masks = [] if static_mask else _image_files(storage.list_uris(storage.join(prefix, "masks")))
    except storage.StorageError as e:
        raise DataError(f"cannot list data prefix {prefix}: {e}") from e
    if not images:
        raise DataError(f"no items in data {prefix}: no images under {images_at}/")
    by_key: dict[str, list[str]] = {}
    masks_at = storage.join(prefix, "masks")
    for m in masks:
        by_key.setdefault(_key(m, masks_at), []).append(m)
    items = []
    for i, uri in enumerate(images):
        key = _key(uri, images_at)
        error, mask = None, static_mask
        if not static_mask:
            found = by_key.get(key, [])
            if len(found) == 1:
                mask = found[0]
            elif not found:
                error = f"image {uri}: no mask with stem {key!r} under {masks_at}/"
            else:
                error = f"image {uri}: several masks with stem {key!r} under {masks_at}/: {found}"
        items.append(Item(index=i, image_id=key, image=uri, mask=mask, label=None, meta={}, error=error,
                          mask_error=error))
    return items


def _image_files(uris: list[str]) -> list[str]:
    # skip dotfiles and sidecars (.DS_Store, README, *.json): only what PIL could decode
    exts = Image.registered_extensions()
    return [u for u in uris if not posixpath.basename(u).startswith(".")
            and posixpath.splitext(u)[1].lower() in exts]


def _key(uri: str, folder: str) -> str:
    """Path below ``folder`` without extension: the file stem for a flat layout."""
    uri, folder = uri.replace(os.sep, "/"), folder.replace(os.sep, "/").rstrip("/") + "/"
    rel = uri[len(folder):] if uri.startswith(folder) else posixpath.basename(uri)
    return posixpath.splitext(rel)[0]


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri.replace(os.sep, "/").rstrip("/")))[0]


def _cell(v):
    """Empty string / NaN / None -> None."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


def _label(v):
    # CSV has no types: '3' is class index 3; names stay strings for the caller to map
    v = _cell(v)
    if isinstance(v, (list, tuple, np.ndarray)):  # a multi-label's labels (JSONL, Parquet): the CSV spelling
        v = ";".join(str(x) for x in v)
        return v or None
    if isinstance(v, (np.integer, bool)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if float(v).is_integer() else float(v)
    if isinstance(v, str):
        v = v.strip()
        return int(v) if _INT.fullmatch(v) else v
    return v


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


def _meta(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


# --- manifest parsers: bytes -> (columns, rows as dicts, the file's camgate metadata) ----------------

def _parse_csv(raw: bytes):
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    header = next(reader, None)
    if not header:
        raise DataError("empty CSV (no header)")
    columns = [h.strip() for h in header]
    records = [r for r in reader if any(c.strip() for c in r)]
    cols = {c: [r[j] if j < len(r) else "" for r in records] for j, c in enumerate(columns)}
    for c in columns:
        if c not in ("image", "mask", "image_id", "label", "boxes", "regions"):
            cols[c] = _infer(cols[c])
    rows = [{c: (cols[c][i] if cols[c][i] != "" else None) for c in columns} for i in range(len(records))]
    return columns, rows, {}


def _infer(values: list[str]) -> list:
    """Numbers stay numbers only when that loses nothing ('007' stays a string)."""
    present = [v for v in values if v != ""]
    if not present:
        return values
    if all(_INT.fullmatch(v) and str(int(v)) == v.lstrip("+") for v in present):
        return [int(v) if v != "" else "" for v in values]
    if all(_FLOAT.fullmatch(v) and any(ch.isdigit() for ch in v) for v in present):
        return [float(v) if v != "" else "" for v in values]
    return values


def _parse_jsonl(raw: bytes):
    rows, columns = [], {}
    for n, line in enumerate(raw.decode("utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {n}: {e}") from e
        if not isinstance(obj, dict):
            raise DataError(f"line {n}: expected a JSON object, got {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
    return list(columns), rows, {}


def _parse_parquet(raw: bytes):
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(raw))
    md = json.loads((table.schema.metadata or {}).get(b"camgate", b"{}"))  # shard manifests say so here
    return list(table.column_names), table.to_pylist(), md if isinstance(md, dict) else {}


_PARSERS = {"csv": _parse_csv, "jsonl": _parse_jsonl, "parquet": _parse_parquet}
