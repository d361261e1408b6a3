"""Data set -> items -> decoded samples, with bounded prefetch.

A data set is either a manifest (``.csv``, ``.jsonl``/``.ndjson`` or ``.parquet``) with columns
``image`` (required), ``mask``, ``label``, ``image_id`` (optional) and any other columns, which are
passed through as metadata; or a prefix (``s3://bucket/set/`` or a local directory) holding
``images/`` and ``masks/`` whose files pair by their path below those folders without extension
(for a flat layout: the file stem).

Relative paths in a manifest resolve against the manifest's folder; a ``..`` that leaves that folder
is refused for that item only. A static mask (fixed camera) replaces per-item masks for every item.
A ``row`` column gives each item its row number in the full manifest (``Item.index``, the results'
``row``): what shard manifests (:mod:`camgate.shards`) keep.

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
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import storage
from .errors import ConfigError
from .modelspec import InputSpec

DEFAULT_MAX_PIXELS = 10_000 * 10_000
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                    ".pq": "parquet"}
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(0|[1-9]\d*)?(\.\d+)?([eE][+-]?\d+)?")  # no leading zeros, no nan/inf
# Shard manifests (Parquet written by camgate.shards.plan, marked by this stage in their metadata) hold
# items as loaded: URIs already resolved against the original manifest, and each item's known error here.
SHARD_STAGE = "shard"
SHARD_ERROR = "_item_error"


class DataError(ConfigError):
    """The data set as a whole is unusable (unreadable manifest, no ``image`` column, no items...)."""


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


@dataclass(frozen=True)
class MaskSpec:
    """How mask pixels map to 'invalid'.

    Default: non-zero (in any colour channel) = invalid. ``invalid_ids``: the mask is a label map and
    pixels whose raw value (palette index for 'P' images) is in the list are invalid. ``invert``
    flips the result, i.e. the mask (or the listed ids) marks the valid region.
    """

    invert: bool = False
    invalid_ids: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, invert: bool = False, invalid_ids: str | None = "") -> "MaskSpec":
        """From user text: ``invalid_ids`` is a comma-separated list ('' = any non-zero pixel is invalid)."""
        ids = [s.strip() for s in str(invalid_ids or "").split(",") if s.strip()]
        try:
            parsed = tuple(int(s) for s in ids) or None
        except ValueError:
            raise ConfigError(f"invalid_ids must be comma-separated integers, got {invalid_ids!r}") from None
        return cls(invert=bool(invert), invalid_ids=parsed)

    def to_dict(self) -> dict:
        return {"invert": self.invert, "invalid_ids": list(self.invalid_ids or [])}

    @classmethod
    def from_dict(cls, d: dict | None) -> "MaskSpec":
        d = d or {}
        return cls(bool(d.get("invert")), tuple(d["invalid_ids"]) if d.get("invalid_ids") else None)


@dataclass
class Sample:
    """A decoded item. ``error`` set => ``x`` and ``mask`` are None and the caller writes an error row.

    ``x``: model input (C, H, W) float32. ``mask``: bool (h_box, w_box), the invalid pixels of the
    image region the model sees, at original resolution; None when the item has no mask.
    """

    item: Item
    x: torch.Tensor | None
    mask: torch.Tensor | None
    error: str | None
    size: tuple[int, int] | None = None  # original image (width, height)
    error_kind: str | None = None  # 'input' | 'storage' (see camgate.results.ERROR_KINDS)
    raw: torch.Tensor | None = None  # JPEG bytes left for the GPU to decode (then ``x`` is None)


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
        raise DataError(f"data {data} holds no items")
    return items


def _manifest_items(uri: str, fmt: str, static_mask: str | None) -> list[Item]:
    try:
        raw = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise DataError(f"cannot read manifest {uri}: {e}") from e
    try:
        columns, rows, md = _PARSERS[fmt](raw)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - csv/json/pyarrow each raise their own types
        raise DataError(f"manifest {uri} is not valid {fmt}: {e}") from e
    if "image" not in columns:
        raise DataError(f"manifest {uri} has no column 'image' (columns: {columns})")
    shard = md.get("stage") == SHARD_STAGE
    reserved = {"image", "mask", "label", "image_id", "row"} | ({SHARD_ERROR} if shard else set())
    items, seen = [], {}
    for i, row in enumerate(rows):
        index = _row_number(uri, row, i) if "row" in columns else i
        if seen.setdefault(index, i) != i:
            raise DataError(f"manifest {uri}: row number {index} appears twice (items {seen[index]} and {i})")
        if shard:  # resolved once, against the original manifest: taken as they are
            image, error = _cell(row.get("image")), _cell(row.get(SHARD_ERROR))
            mask, err = _cell(row.get("mask")), None
        else:
            image, error = _ref(uri, row.get("image"), "image")
            mask, err = _ref(uri, row.get("mask"), "mask")
        if image is None and error is None:
            error = f"row {index}: empty 'image' cell"
        if static_mask:
            mask = static_mask
        else:
            error = error or err
        image_id = _cell(row.get("image_id"))
        if image_id is None:
            image_id = _stem(image or _cell(row.get("image")) or "") or f"row-{index}"
        items.append(Item(
            index=index, image_id=str(image_id), image=image, mask=mask,
            label=_label(row.get("label")),
            meta={k: _meta(row.get(k)) for k in columns if k not in reserved},
            error=error))
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
        raise DataError(f"no images under {images_at}/")
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
        items.append(Item(index=i, image_id=key, image=uri, mask=mask, label=None, meta={}, error=error))
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
    if isinstance(v, (np.integer, bool)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if float(v).is_integer() else float(v)
    if isinstance(v, str):
        v = v.strip()
        return int(v) if _INT.fullmatch(v) else v
    return v


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
        if c not in ("image", "mask", "image_id", "label"):
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


# --- decoding --------------------------------------------------------------------------------

def max_pixels() -> int:
    try:
        return int(float(os.environ.get("CAMGATE_MAX_PIXELS", DEFAULT_MAX_PIXELS)))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def _open(data: bytes, load: bool = True) -> Image.Image:
    """Bytes -> fully decoded PIL image (first frame), or ValueError saying what is wrong.
    ``load=False`` checks the header only (size, bomb limit) and leaves the pixels undecoded."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    limit = max_pixels()
    # PIL's own bomb check reads this module global; keep it in line with ours so a larger
    # CAMGATE_MAX_PIXELS is honoured and a smaller one already stops PIL
    Image.MAX_IMAGE_PIXELS = limit
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb refused ({e}; limit CAMGATE_MAX_PIXELS={limit})") from e
    except UnidentifiedImageError as e:
        raise ValueError("not a recognised image format") from e
    except Exception as e:  # noqa: BLE001 - plugins raise SyntaxError/OSError/struct.error on bad headers
        raise ValueError(f"corrupt image header ({e})") from e
    w, h = img.size
    # checked here too: PIL only warns between 1x and 2x its limit, and filters may hide the warning
    if w * h > limit:
        raise ValueError(f"decompression bomb refused: {w}x{h} = {w * h} pixels exceeds the limit of "
                         f"{limit} (CAMGATE_MAX_PIXELS)")
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}x{h})")
    if not load:
        return img
    try:
        img.load()  # force the full decode: Image.open only reads the header
    except (OSError, SyntaxError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"truncated or corrupt image ({e})") from e
    return img


def decode_image(data: bytes, name: str) -> Image.Image:
    """Bytes -> RGB PIL image. Alpha is dropped (not composited); 16-bit/32-bit grey is scaled to 8 bit."""
    img = _open(data)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) / 257.0  # 0..65535 -> 0..255
    elif mode == "I":
        # PIL decodes 16-bit PNG/TIFF grey into 32-bit 'I'; treat it as a 16-bit container
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
    elif mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        a = a * 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else np.clip(a, 0, 255)
    else:
        if mode == "PA" or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # PIL refuses P+transparency -> RGB without a warning
        return img.convert("RGB")
    return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")


def decode_mask(data: bytes, name: str, spec: MaskSpec, size: tuple[int, int]) -> np.ndarray:
    """Bytes -> bool (h, w) invalid-pixel mask at image ``size`` = (w, h), resized with NEAREST."""
    img = _open(data)
    mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        img = img.convert({"RGBA": "RGB", "LA": "L", "PA": "P"}[mode])  # alpha is not mask content
    elif mode not in ("1", "L", "P", "I", "F", "RGB") and not mode.startswith("I;16"):
        img = img.convert("RGB")  # CMYK, YCbCr, ...
    a = np.asarray(img)
    if a.ndim == 3:
        if spec.invalid_ids is not None:
            if not (a == a[..., :1]).all():
                raise ValueError(f"label-map mask needs one channel, got a colour {img.mode} image")
            a = a[..., 0]
        else:
            a = a.any(axis=2)
    if spec.invalid_ids is not None:
        invalid = np.isin(a, np.asarray(spec.invalid_ids))
    else:
        invalid = a != 0
    if spec.invert:
        invalid = ~invalid
    if (invalid.shape[1], invalid.shape[0]) != tuple(size):
        invalid = np.asarray(Image.fromarray(invalid.astype(np.uint8)).resize(tuple(size), Image.NEAREST)) != 0
    return invalid


class StaticMask:
    """One mask for every item: read once, decoded once per image size (thread-safe)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._lock = threading.RLock()
        self._raw: bytes | None = None
        self._decoded: dict[tuple, np.ndarray] = {}

    def raw(self) -> bytes:
        with self._lock:
            if self._raw is None:
                self._raw = storage.read_bytes(self.uri)
            return self._raw

    def get(self, spec: MaskSpec, size: tuple[int, int]) -> np.ndarray:
        key = (spec, tuple(size))
        with self._lock:  # held while decoding: a new size is decoded once, not once per worker
            hit = self._decoded.get(key)
            if hit is None:
                hit = decode_mask(self.raw(), self.uri, spec, size)
                hit.setflags(write=False)  # shared between samples
                self._decoded[key] = hit
            return hit

    def check(self, spec: MaskSpec) -> None:
        """Fail the run early (DataError) if the static mask cannot be read or decoded."""
        try:
            self.get(spec, _open(self.raw()).size)  # decoded at its own size, cached like any other
        except (storage.StorageError, ValueError) as e:
            raise DataError(f"static mask {self.uri}: {e}") from e


def model_view(mask: np.ndarray, input_spec: InputSpec, size: tuple[int, int]) -> np.ndarray:
    """The part of an image-size mask the model sees (``input_spec.box``), as its own copy:
    cached static masks are read-only and shared between samples."""
    left, top, right, bottom = input_spec.box(*size)
    return mask[top:bottom, left:right].copy()


def load_sample(item: Item, input_spec: InputSpec, mask_spec: MaskSpec,
                static_mask: str | StaticMask | None = None, with_mask: bool = True,
                defer_jpeg: bool = False) -> Sample:
    """Fetch + decode one item. Never raises: problems come back as ``Sample.error`` naming the item.

    ``with_mask=False`` (heatmaps only) leaves the item's mask unread: it is analysed later.
    ``defer_jpeg``: a colour or grey JPEG is only checked (header, size limit) and handed on as
    ``Sample.raw`` for the GPU to decode (:mod:`camgate.gpu`); other images decode here."""
    if item.error:
        return Sample(item, None, None, item.error, error_kind="input")
    what, uri = "image", item.image
    try:
        data = storage.read_bytes(uri)
        raw, x = None, None
        if defer_jpeg and data[:3] == b"\xff\xd8\xff":
            img = _open(data, load=False)
            if img.format == "JPEG" and img.mode in ("RGB", "L"):  # what nvJPEG decodes to RGB (not CMYK)
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if raw is None:
            img = decode_image(data, uri)
            x = input_spec.image_tensor(img)
        mask = None
        if not with_mask:
            full = None
        elif static_mask is not None:
            what, uri = "mask", static_mask.uri if isinstance(static_mask, StaticMask) else static_mask
            sm = static_mask if isinstance(static_mask, StaticMask) else StaticMask(static_mask)
            full = sm.get(mask_spec, img.size)
        elif item.mask:
            what, uri = "mask", item.mask
            full = decode_mask(storage.read_bytes(uri), uri, mask_spec, img.size)
        else:
            full = None
        if full is not None:
            mask = torch.from_numpy(model_view(full, input_spec, img.size))
        return Sample(item, x, mask, None, img.size, raw=raw)
    except (storage.StorageError, ValueError) as e:  # both already say what went wrong
        problem, kind = str(e), storage_error_kind(e)
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the run
        problem, kind = f"{type(e).__name__}: {e}", "input"
    return Sample(item, None, None, f"{what} {uri} (id {item.image_id}): {problem}", error_kind=kind)


def decode_deferred(sample: Sample, input_spec: InputSpec) -> None:
    """A deferred JPEG the GPU could not decode: decode it here, or make it the item's error."""
    item = sample.item
    try:
        sample.x = input_spec.image_tensor(decode_image(sample.raw.numpy().tobytes(), item.image))
    except ValueError as e:
        sample.x, sample.mask, sample.error, sample.error_kind = None, None, \
            f"image {item.image} (id {item.image_id}): {e}", "input"
    sample.raw = None


def storage_error_kind(e: Exception) -> str:
    """'storage' for a failure of the storage service (worth retrying later), else 'input'."""
    return "storage" if isinstance(e, storage.StorageError) and not isinstance(e, storage.NotFound) else "input"


def iter_batches(items: Iterable[Item], input_spec: InputSpec, mask_spec: MaskSpec, batch_size: int,
                 workers: int = 4, prefetch: int = 2, static_mask: str | StaticMask | None = None,
                 with_masks: bool = True, overlap: bool = True, defer_jpeg: bool = False
                 ) -> Iterator[list[Sample]]:
    """Yield lists of ``batch_size`` samples (the last may be shorter) in item order.

    Loading runs in ``workers`` threads ahead of the consumer, so fetch and decode overlap the
    model's compute. At most ``batch_size * (prefetch + 1)`` items are submitted but not yet handed
    out, so memory stays flat however many items there are. Error samples are yielded like the rest.
    ``overlap=False`` loads a batch only when the consumer asks for it (a model on the CPU needs the
    cores while it computes, see :func:`camgate.gpu.cpu_budget`). ``defer_jpeg``: see :func:`load_sample`.
    An unreadable static mask raises :class:`DataError` here, before anything is loaded.
    """
    if batch_size < 1 or workers < 1 or prefetch < 0:
        raise ConfigError("batch_size and workers must be >= 1, prefetch >= 0")
    if isinstance(static_mask, str):
        static_mask = StaticMask(static_mask)
    if static_mask is not None:
        static_mask.check(mask_spec)
    return _batches(items, input_spec, mask_spec, batch_size, workers, prefetch if overlap else 0,
                    static_mask, with_masks, overlap, defer_jpeg)


def _batches(items, input_spec, mask_spec, batch_size, workers, prefetch, static_mask, with_masks, overlap,
             defer_jpeg):
    limit = batch_size * (prefetch + 1)
    source = iter(items)
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="camgate-load") as pool:
        def fill():
            while len(pending) < limit:
                item = next(source, None)
                if item is None:
                    return
                pending.append(pool.submit(load_sample, item, input_spec, mask_spec, static_mask, with_masks,
                                           defer_jpeg))

        try:
            fill()
            while pending:
                batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
                if overlap:
                    fill()  # top up before handing out, so loading continues during the caller's compute
                yield batch
                if not overlap:
                    fill()
        finally:
            for f in pending:  # consumer stopped early: do not load what nobody will read
                f.cancel()
