"""Results Parquet: the schema, a streaming writer and readers.

One row per manifest item, in manifest order, failures included; ``row`` is the item's 0-based
position in the full manifest (it survives sharding, and it is what masks, overlays and baselines pair
on). ``cam`` holds the raw ReLU'd low-resolution map as float32 bytes (row-major, ``cam_height`` ×
``cam_width``): metrics recomputed from a stored map equal the in-process ones (files written before
float32 maps hold float16; :func:`cam_array`, the one decoder, reads both). Normalised or upsampled
views are derived on demand (:func:`cam_array`, :func:`camgate.cam.normalized`).

Rows are written in row groups as they come, so memory does not grow with the number of images, and
the file only becomes visible at its destination once complete.
"""
from __future__ import annotations

import base64
import json
import os
import posixpath
import shutil
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from . import storage

FIELDS = [
    ("row", pa.int64()), ("image_id", pa.string()), ("image", pa.string()), ("mask", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
    ("label", pa.string()), ("predicted_class", pa.int32()), ("predicted_label", pa.string()),
    ("predicted_score", pa.float32()), ("target_class", pa.int32()),
    ("method", pa.string()), ("target_layer", pa.string()),
    ("invalid_activation_ratio", pa.float64()), ("invalid_area_ratio", pa.float64()),
    ("peak_in_invalid", pa.bool_()), ("topk_invalid_share", pa.float64()),
    ("relevance_rank_accuracy", pa.float64()), ("auc", pa.float64()),
    ("cam_height", pa.int32()), ("cam_width", pa.int32()), ("cam", pa.binary()),
    ("image_width", pa.int32()), ("image_height", pa.int32()),
    # sha256 of the image and mask bytes the row was computed from (None where not read): the run
    # identity's data fingerprint is taken over them (see camgate.runner.identity)
    ("image_sha256", pa.string()), ("mask_sha256", pa.string()),
]


# the sanity checks' columns of a ROAD file (`camgate road --sanity`; camgate.metrics.sanity.SanityChecks)
SANITY_FIELDS = [("randomised_spearman", pa.float64()), ("randomised_ssim", pa.float64()),
                 ("random_logit_class", pa.int32()), ("random_logit_spearman", pa.float64()),
                 ("random_logit_ssim", pa.float64())]
SANITY_SIMILARITIES = tuple(n for n, t in SANITY_FIELDS if t == pa.float64())


def road_fields(percentiles, sanity: bool = False) -> list:
    """`camgate road`: one row per (image, layer); curves are target-class probabilities after removing
    p % of the pixels, most (MoRF) or least (LeRF) relevant first; ``sanity``: the sanity checks' columns
    (similarities in [-1, 1], null unless the row is ok)."""
    curves = [(f"road_{kind}_p{int(p):02d}", pa.float64()) for kind in ("morf", "lerf") for p in percentiles]
    checks = SANITY_FIELDS if sanity else []
    return [("row", pa.int64()), ("image_id", pa.string()), ("image", pa.string()), ("layer", pa.string()),
            ("layer_index", pa.int32()), ("status", pa.string()), ("error", pa.string()),
            ("error_kind", pa.string()), ("target_class", pa.int32()), ("clean_probability", pa.float64()),
            *curves, ("road", pa.float64()), ("road_random", pa.float64()), *checks, ("image_sha256", pa.string())]
# object detectors (model card ``task: detection``): one row per (image, explained object); ``row`` stays
# the image's manifest position and ``det_index`` (the detection's rank in the image) is the second key.
# Boxes are xyxy in original image pixels (a ``missed`` row: the ground-truth box); ``gt_index``/``iou``
# when ground truth was given; predicted_*/target_class hold the detection's class, label and score.
DETECTION_FIELDS = [
    ("det_index", pa.int32()), ("det_class", pa.int32()), ("det_label", pa.string()), ("det_score", pa.float32()),
    ("box_x1", pa.float32()), ("box_y1", pa.float32()), ("box_x2", pa.float32()), ("box_y2", pa.float32()),
    ("gt_index", pa.int32()), ("iou", pa.float32()),
    ("outside_box_ratio", pa.float64()), ("box_invalid_area", pa.float64()),
]
BOX_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2")
# semantic segmentation (``task: segmentation``): one row per (image, class explained: target_class =
# predicted_class); the class's region at the model output's resolution (bool, row-major, np.packbits;
# kept in heatmaps files so that `analyze` gives `run`'s numbers) and the region metrics. Multi-label
# rows (one per label) need no column beyond the classification ones.
SEGMENTATION_FIELDS = [
    ("region_pixels", pa.int64()), ("region_height", pa.int32()), ("region_width", pa.int32()),
    ("region", pa.binary()), ("outside_region_ratio", pa.float64()), ("region_invalid_area", pa.float64()),
]


def task_fields(task: str | None) -> list:
    """The results columns of a task's files."""
    return FIELDS + {"detection": DETECTION_FIELDS, "segmentation": SEGMENTATION_FIELDS}.get(task or "", [])


COLUMNS = [name for name, _ in FIELDS + DETECTION_FIELDS + SEGMENTATION_FIELDS]
# `camgate layers`: one row per (image, layer) of the all-layer maps (same map encoding as above)
LAYER_FIELDS = [
    ("row", pa.int64()), ("image_id", pa.string()), ("image", pa.string()), ("mask", pa.string()),
    ("layer", pa.string()), ("layer_index", pa.int32()), ("status", pa.string()), ("error", pa.string()),
    ("error_kind", pa.string()), ("predicted_class", pa.int32()), ("target_class", pa.int32()),
    ("invalid_activation_ratio", pa.float64()), ("invalid_area_ratio", pa.float64()),
    ("peak_in_invalid", pa.bool_()), ("topk_invalid_share", pa.float64()),
    ("cam_height", pa.int32()), ("cam_width", pa.int32()), ("cam", pa.binary()),
    ("image_width", pa.int32()), ("image_height", pa.int32()), ("image_sha256", pa.string()),
    ("mask_sha256", pa.string()),
]
# no_detection: an image without a detection to explain (one row, no map); missed: a ground-truth box
# that no detection matched (no map). Both keep the image accounted for, as error rows do.
# no_region: a segmentation class without a pixel in its region, or an image without a class to explain;
# no_label: a multi-label image without a positive label (one row each, no map, `error` says why).
STATUSES = ("ok", "no_activation", "error", "no_detection", "missed", "no_region", "no_label")
# the statuses only a task's files hold (the gate counts them for those tasks only)
TASK_STATUSES = {"detection": ("no_detection", "missed"), "segmentation": ("no_region",), "multilabel": ("no_label",)}
# What an error row's cause was: the input itself (missing, corrupt, refused), the storage service
# (access, or still failing after the retries: worth another try later), or the model (NaN, raised).
ERROR_KINDS = ("input", "storage", "model")
META_KEY = b"camgate"
_ARROW_SCHEMA = b"ARROW:schema"  # where Parquet files keep the Arrow schema (and its metadata)
IDENTITY_KEY = "identity"  # the run identity in the metadata (built by camgate.runner.identity)


def schema(meta_columns: dict[str, pa.DataType] | None = None, metadata: dict | None = None,
           fields: list | None = None) -> pa.Schema:
    fields = list(fields or FIELDS)
    fields += meta_fields(meta_columns, fields)
    md = {META_KEY: json.dumps(metadata or {}, sort_keys=True, default=str).encode()}
    return pa.schema(fields, metadata=md)


def meta_fields(meta_columns: dict[str, pa.DataType] | None, fields: list | None = None) -> list:
    """(column, type) of each metadata column in a results file (see :func:`meta_column`). Two metadata
    columns that would land in one column (``status`` and ``meta_status``), or one that is a column of
    ``fields`` already, raise :class:`ConfigError` naming them: before anything is computed or written."""
    taken: dict[str, str | None] = {name: None for name, _ in (fields or FIELDS)}
    out = []
    for name, typ in (meta_columns or {}).items():
        col = meta_column(name)
        if col in taken:
            other = taken[col]
            clash = f"metadata columns {other!r} and {name!r} would both be" if other is not None else \
                f"metadata column {name!r} would be"
            raise ConfigError(f"{clash} the results column {col!r} (a metadata column named like a results column "
                              f"gets the prefix 'meta_'): rename the column {name!r} in the data")
        taken[col] = name
        out.append((col, pa.string() if pa.types.is_null(typ) else typ))
    return out


_INT64 = (-(1 << 63), (1 << 63) - 1)


def meta_types(metas: Iterable[dict]) -> dict[str, pa.DataType]:
    """Arrow types of the metadata columns, inferred over all items (so a late value cannot break the schema).

    A column with an integer outside int64 (a serial number, a hash) is kept as text, like a column of
    mixed types: nothing is lost, and no later write fails on it."""
    metas = list(metas)
    names: dict[str, None] = {}
    for m in metas:
        names.update(dict.fromkeys(m))
    types = {}
    for n in names:
        values = [m.get(n) for m in metas]
        if any(isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1] for v in values):
            types[n] = pa.string()
            continue
        try:
            types[n] = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types: keep them as text
            types[n] = pa.string()
    return types


def meta_column(name: str) -> str:
    """A metadata column may not shadow a result column: such a name gets a ``meta_`` prefix."""
    return f"meta_{name}" if name in COLUMNS else name


def meta_value(v, typ: pa.DataType):
    return None if v is None else (str(v) if pa.types.is_string(typ) and not isinstance(v, str) else v)


class ResultsWriter:
    """Streams rows into a Parquet file that appears at ``uri`` (local or s3://) only when complete.

    With a ``fingerprint`` (a hash of everything that determines the rows) rows are committed as they
    come in numbered part files under ``parts`` (default ``<uri>.parts/``; any local or s3:// folder,
    e.g. under a pipeline's output prefix, so a restarted pod finds them), each written atomically. If
    the process dies, a new writer with the same fingerprint finds them and reports ``resumed`` rows
    already done; the caller skips those items, except ``retry``: rows committed as errors of the
    storage service (a transient outage), which the caller computes again and hands to
    :meth:`replace`. On close the parts are merged in order into ``uri`` and removed, so the final file
    equals an uninterrupted run's; while rows failed on the storage service the parts are kept
    (``storage_errors``), so running the same command again retries just those rows. Parts from
    another run configuration are discarded.
    """

    def __init__(self, uri: str, schema: pa.Schema, row_group_size: int = 256, fingerprint: str | None = None,
                 parts: str | None = None, tracker=None):
        self.uri, self.schema, self.row_group_size, self.fingerprint = uri, schema, row_group_size, fingerprint
        # sees every table in the final file's order; its ``metadata()`` is merged into the file's
        # metadata on close (the data fingerprint, known only once every row is written)
        self.tracker = tracker
        self.parts = parts or f"{uri}.parts"
        self._buf: list[dict] = []
        self.rows = 0
        self.items = 0  # items (images) written: an item has one row, or one per explained object
        self.resumed = 0  # items taken from committed parts
        self.resumed_status: list[str] = []
        self.retry: list[int] = []  # item positions (0-based, in this writer's order) to compute again
        self._spans: list[tuple[int, int, str]] = []  # (first item position, items, part URI) of committed parts
        self.storage_errors = 0  # rows of the final file that failed on the storage service

    def __enter__(self) -> "ResultsWriter":
        if self.fingerprint:
            self._resume()
        else:
            self._ctx = storage.atomic_output(self.uri)
            self._writer = pq.ParquetWriter(self._ctx.__enter__(), self.schema, compression="zstd")
        return self

    def _part_uris(self) -> list[str]:
        return [u for u in storage.list_uris(self.parts) if posixpath.basename(u).startswith("part-")]

    def _resume(self) -> None:
        marker = storage.join(self.parts, "_run.json")
        same = storage.exists(marker) and json.loads(storage.read_bytes(marker)).get("fingerprint") == self.fingerprint
        if not same:
            self._clear()
            storage.write_bytes(marker, json.dumps({"fingerprint": self.fingerprint}).encode())
            return
        for u in self._part_uris():  # names carry the first item's position: contiguous parts only
            start = int(posixpath.basename(u).split("-")[1].split(".")[0])
            if start != self.resumed:
                break
            part = pq.read_table(pa.BufferReader(storage.read_bytes(u)), columns=["row", "status", "error_kind"])
            status, kinds = part.column("status").to_pylist(), part.column("error_kind").to_pylist()
            groups = _item_groups(part.column("row").to_pylist())
            self.retry += [start + j for j, (a, b) in enumerate(groups) if "storage" in kinds[a:b]]
            self.resumed_status += status
            self._spans.append((start, len(groups), u))
            self.resumed += len(groups)
            self.rows += part.num_rows
        self.items = self.resumed

    def replace(self, positions: list[int], rows: list[list[dict]]) -> None:
        """Swap the rows of committed items (by item position) for recomputed ones (per item its list of
        rows); each touched part is rewritten atomically under its name (which counts items, not rows)."""
        new = dict(zip(positions, rows))
        for start, n, u in self._spans:
            mine = [p for p in new if start <= p < start + n]
            if not mine:
                continue
            table = pq.read_table(pa.BufferReader(storage.read_bytes(u))).cast(self.schema).to_pylist()
            groups = _item_groups([r["row"] for r in table])
            out = [r for j, (a, b) in enumerate(groups) for r in new.get(start + j, table[a:b])]
            storage.write_bytes(u, _part_bytes(out, self.schema))
        status = []
        for _, _, u in self._spans:
            status += pq.read_table(pa.BufferReader(storage.read_bytes(u)), columns=["status"]).column(
                "status").to_pylist()
        self.resumed_status = status

    def write(self, rows: Iterable[dict]) -> None:
        self._buf.extend(rows)
        if len(self._buf) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        if self.fingerprint:
            storage.write_bytes(storage.join(self.parts, f"part-{self.items:012d}.parquet"),
                                _part_bytes(self._buf, self.schema))
            self.items += len(_item_groups([r.get("row") for r in self._buf]))
        else:
            table = _table(self._buf, self.schema)
            self._track(table)
            self._writer.write_table(table)
        self.rows += len(self._buf)
        self._buf = []

    def _merge(self) -> None:
        with storage.atomic_output(self.uri) as path, pq.ParquetWriter(path, self.schema, compression="zstd") as w:
            for u in self._part_uris():
                part = pq.read_table(pa.BufferReader(storage.read_bytes(u))).cast(self.schema)
                self.storage_errors += part.column("error_kind").to_pylist().count("storage")
                self._track(part)
                w.write_table(part)
            self._finish_metadata(w)
        if not self.storage_errors:
            self._clear()

    def _track(self, table: pa.Table) -> None:
        if self.tracker is not None:
            self.tracker.add(table)

    def _finish_metadata(self, writer: pq.ParquetWriter) -> None:
        """The tracker's metadata into the file being written (its footer is written on close). Readers
        take the schema's metadata from the stored Arrow schema, so that is replaced too."""
        if self.tracker is None:
            return
        md = {**json.loads((self.schema.metadata or {}).get(META_KEY, b"{}")), **self.tracker.metadata()}
        value = json.dumps(md, sort_keys=True, default=str).encode()
        self.schema = self.schema.with_metadata({**(self.schema.metadata or {}), META_KEY: value})
        writer.add_key_value_metadata({META_KEY: value,
                                       _ARROW_SCHEMA: base64.b64encode(self.schema.serialize().to_pybytes())})

    def _clear(self) -> None:
        for u in storage.list_uris(self.parts):
            storage.delete(u)
        local = storage.local_path(self.parts)
        if local:
            shutil.rmtree(local, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        if self.fingerprint:
            if exc_type is None:
                self._flush()
                self._merge()
            return False  # on error the committed parts stay for the next attempt
        try:
            if exc_type is None:
                self._flush()
                self._finish_metadata(self._writer)
        finally:
            self._writer.close()
            self._ctx.__exit__(exc_type, exc, tb)
        return False


def _item_groups(rows: list) -> list[tuple[int, int]]:
    """(start, end) of each run of equal ``row`` values: the rows of one item, written together."""
    bounds = [i for i in range(1, len(rows)) if rows[i] != rows[i - 1]]
    return list(zip([0, *bounds], [*bounds, len(rows)])) if rows else []


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.table({n: [r.get(n) for r in rows] for n in schema.names}, schema=schema)


def _part_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(_table(rows, schema), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def open_file(uri: str) -> pq.ParquetFile:
    """A results (or heatmaps) file, local or s3://, for streaming reads."""
    local = storage.local_path(uri)
    return pq.ParquetFile(local if local else pa.BufferReader(storage.read_bytes(uri)))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A whole results (or heatmaps) file, local or s3://, as an Arrow table."""
    return open_file(uri).read(columns=columns)


def read(uri: str, columns: list[str] | None = None):
    """A results (or heatmaps, layers, ROAD) file as a pandas DataFrame, one row per image.

    The run's metadata (model, method, policy...) is in ``df.attrs['camgate']``; decode a row's map
    with :func:`cam_array` (``cam_array(df.iloc[i])``)."""
    table = read_table(uri, columns)
    df = table.to_pandas()
    df.attrs["camgate"] = run_metadata(table)
    return df


def run_metadata(source) -> dict:
    """The run's metadata (key ``camgate``) from a table, a schema or a file URI."""
    if isinstance(source, pa.Table):
        sch = source.schema
    elif isinstance(source, pa.Schema):
        sch = source
    else:
        sch = open_file(source).schema_arrow
    return json.loads((sch.metadata or {}).get(META_KEY, b"{}"))


# keys of files written before the run identity that say the same thing (their identity is read from them)
_LEGACY_IDENTITY = ("model_card_sha256", "weights_sha256", "method", "target", "static_mask", "mask_spec", "topk",
                    "budget", "seed")


def file_identity(md: dict) -> dict:
    """The run identity a file's metadata states (see :mod:`camgate.runner.identity`): its ``identity``,
    or for files written before it, what their settings keys say (only the keys they have)."""
    ident = md.get(IDENTITY_KEY)
    if isinstance(ident, dict):
        return ident
    legacy = {k: md[k] if md[k] != "" else None for k in _LEGACY_IDENTITY if k in md}  # "" = no hash
    layers = md.get("target_layer", md.get("layers"))
    if layers is not None:
        legacy["target_layer"] = layers
    return legacy


def identity_differences(a: dict, b: dict, fields) -> list[tuple[str, object, object]]:
    """``(field, value in a, value in b)`` for each of ``fields`` that both identities state and that
    differs (a field one of them lacks cannot be compared: callers decide whether that is acceptable)."""
    return [(f, a[f], b[f]) for f in fields if f in a and f in b and a[f] != b[f]]


def cam_bytes(cam) -> bytes:
    """(h, w) float tensor/array -> float32 bytes, exactly the values the metrics were computed from."""
    a = cam.detach().float().cpu().numpy() if hasattr(cam, "detach") else np.asarray(cam, dtype=np.float32)
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def cam_array(row) -> np.ndarray | None:
    """A row's raw map as float32 (h, w), or None for rows without one (a dict or a DataFrame row).

    The byte count tells the storage type: 4 per cell (float32) or 2 (float16, older files)."""
    raw = row.get("cam")
    if raw is None or not len(raw):
        return None
    h, w = int(row["cam_height"]), int(row["cam_width"])
    dtype = np.float32 if len(raw) == 4 * h * w else np.float16
    return np.frombuffer(raw, dtype=dtype).reshape(h, w).astype(np.float32)


def region_bytes(region) -> bytes:
    """A segmentation row's region (bool (h, w), tensor or array) as stored: row-major, np.packbits."""
    a = region.cpu().numpy() if hasattr(region, "cpu") else np.asarray(region)
    return np.packbits(a.astype(bool).reshape(-1)).tobytes()


def region_array(row) -> np.ndarray | None:
    """A segmentation row's stored region -> bool (region_height, region_width), None without one."""
    raw = row.get("region")
    if raw is None:
        return None
    h, w = int(row["region_height"]), int(row["region_width"])
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=h * w).reshape(h, w).astype(bool)


# Columns evaluate() and the reports read; `cam` is deliberately absent (it is the bulk of the file).
RESULT_COLUMNS = (
    "row", "image_id", "image", "status", "error", "label", "predicted_class", "predicted_label",
    "invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid", "det_index",
)
REQUIRED_COLUMNS = ("status", "invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid")


class ResultsError(ConfigError):
    """The results table lacks a column or holds values outside the results contract."""


def read_results(results: pa.Table | str | os.PathLike, columns=RESULT_COLUMNS) -> pa.Table:
    """The requested columns that exist, from a table or a results file (local path or URI): what
    the gate and the reports read. A file that is not results Parquet raises :class:`ResultsError`."""
    columns = list(dict.fromkeys(columns))
    if isinstance(results, pa.Table):
        return results.select([c for c in columns if c in results.column_names])
    try:
        pf = open_file(os.fspath(results))
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
    except (OSError, pa.ArrowException) as e:
        raise ResultsError(f"{results}: cannot read results Parquet: {e}") from None
