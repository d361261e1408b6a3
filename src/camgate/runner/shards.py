"""Scale-out: split a data set into shard manifests, compute each shard anywhere, merge the parts.

:func:`plan` writes N shard manifests (Parquet, contiguous rows, sizes within one of each other).
Each holds its items as loaded from the full data set, ``row`` included, so a shard's results carry
full-manifest rows and every item error known before loading (a refused path, a missing mask) stays
the same error. :func:`run_shard` is the worker: one shard's results beside its manifest plus a
completion marker, so a shard already done is not computed again. :func:`merge` puts the parts
back in manifest order and refuses parts that do not add up to the data set exactly once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..data.manifest import SHARD_ERROR, SHARD_MASK_ERROR, SHARD_STAGE, load_items
from ..errors import ConfigError
from ..io import results as res
from ..io import storage

log = logging.getLogger(__name__)

__all__ = ["MergeError", "plan", "ranges", "shard_name", "part_uris", "run_shard", "merge"]

_SHARD = re.compile(r"^(?P<base>.*)shard-(?P<k>\d{5})-of-(?P<n>\d{5})\.parquet$")
# keys of the run metadata that differ between the shards of one run by construction
_PER_SHARD = ("data", "masks_from")
_SHOWN = 5  # rows or parts named in one message


class MergeError(ConfigError):
    """Parts that do not add up to one run over the data set (missing, duplicated, foreign)."""


def ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, stop) ranges over n items, sizes within one of each other."""
    return [(k * n // shards, (k + 1) * n // shards) for k in range(shards)]


def shard_name(k: int, shards: int) -> str:
    return f"shard-{k:05d}-of-{shards:05d}.parquet"


def part_uris(shard: str) -> tuple[str, str]:
    """(results part, completion marker) of a shard manifest: beside it, so the manifest's URI is all a
    worker needs."""
    base = shard[: -len(".parquet")] if shard.endswith(".parquet") else shard
    return f"{base}.results.parquet", f"{base}.done.json"


def _shard_count(shards) -> int:
    try:
        n = int(shards)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(shards).strip() not in (str(n), f"{n}.0"):
        raise ConfigError(f"shards must be an integer >= 1, got {shards!r}")
    return n


# --------------------------------------------------------------------------- plan


def plan(data: str, shards: int, out_prefix: str, static_mask: str | None = None) -> list[str]:
    """Write the shard manifests of ``data`` under ``out_prefix``; return their URIs in row order.

    Deterministic: the same data set and count give the same files. More shards than items gives one
    item per shard. ``static_mask``: as for ``run`` (a prefix data set then needs no ``masks/``).
    """
    shards = _shard_count(shards)
    items = load_items(data, static_mask)
    types = res.meta_types(it.meta for it in items)
    for name in (SHARD_ERROR, SHARD_MASK_ERROR):
        if name in types:
            raise ConfigError(f"data {data} has a column {name!r}, which shard manifests reserve")
    res.meta_fields(types)  # metadata columns the results cannot hold fail here, not in every shard's run
    fields = [("row", pa.int64()), ("image_id", pa.string()), ("image", pa.string()), ("mask", pa.string()),
              ("label", pa.string()), ("boxes", pa.string()), ("regions", pa.string()), (SHARD_ERROR, pa.string()),
              (SHARD_MASK_ERROR, pa.string())]
    fields += [(k, pa.string() if pa.types.is_null(t) else t) for k, t in types.items()]
    n = min(shards, len(items))
    uris = []
    for k, (a, b) in enumerate(ranges(len(items), n)):
        md = {"stage": SHARD_STAGE, "data": data, "static_mask": static_mask, "shard": k, "shards": n}
        schema = pa.schema(fields, metadata={res.META_KEY: json.dumps(md, sort_keys=True).encode()})
        part = items[a:b]
        cols = {"row": [it.index for it in part], "image_id": [it.image_id for it in part],
                "image": [it.image for it in part], "mask": [it.mask for it in part],
                # labels come back through the manifest reader, which turns '3' into class index 3 again
                "label": [None if it.label is None else str(it.label) for it in part],
                # raw, as JSON text: parsed per item when the shard runs, so a bad cell stays that item's error
                "boxes": [b if b is None or isinstance(b, str) else json.dumps(b, default=str)
                          for b in (it.boxes for it in part)],
                "regions": [it.regions for it in part],  # resolved against the original manifest, as image
                # kept apart, so a static mask given to the worker replaces the mask and its error, as in run
                SHARD_ERROR: [it.image_error for it in part], SHARD_MASK_ERROR: [it.mask_error for it in part]}
        cols.update({name: [res.meta_value(it.meta.get(name), typ) for it in part] for name, typ in types.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols, schema=schema), sink, compression="zstd")
        uri = storage.join(out_prefix, shard_name(k, n))
        storage.write_bytes(uri, sink.getvalue().to_pybytes())
        uris.append(uri)
    return uris


# --------------------------------------------------------------------------- worker


def run_shard(model, shard: str, *, attempts: int = 3, **run_args) -> dict:
    """Heatmaps and metrics of one shard -> its part (see :func:`part_uris`); returns the run summary
    with ``part`` and ``skipped``.

    A shard whose part and completion marker exist, written for the same model, shard manifest, content
    of its images and masks (sha256) and settings, is not computed again (a re-submitted pipeline redoes
    only the shards that did not finish, and those whose files changed under the same URIs). A
    failure other than the user's is retried up to ``attempts`` times, resuming from the rows the
    failed attempt committed (KFP ignores task retries inside a ParallelFor). ``model``: a model card
    URI or a :class:`camgate.model.LoadedModel`; ``run_args``: as for :func:`camgate.runner.run`.
    """
    from ..model.load import LoadedModel, load_model
    from .heatmaps import run

    lm = model if isinstance(model, LoadedModel) else load_model(model, device=run_args.pop("device", "auto"))
    part, marker = part_uris(shard)
    key = hashlib.sha256(json.dumps(
        {"camgate": __version__, "model": lm.metadata(), "shard": storage.sha256(shard),
         "content": _content(shard, run_args.get("static_mask")), "settings": run_args,
         **({"annotations": storage.sha256(run_args["annotations"])} if run_args.get("annotations") else {})},
        sort_keys=True, default=str).encode()).hexdigest()
    if storage.exists(marker) and storage.exists(part):
        done = json.loads(storage.read_bytes(marker))
        if done.get("key") == key:
            return {**done["summary"], "part": part, "skipped": True}
    attempts = max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        try:
            summary = run(lm, shard, part, progress=False, **run_args).to_dict()
            break
        except ConfigError:
            raise  # the user's to fix: the same again would fail the same way
        except Exception as e:  # noqa: BLE001 - a node, device or service hiccup: resume and try again
            if attempt == attempts:
                raise
            log.warning("shard %s: attempt %d of %d failed (%s: %s); resuming", shard, attempt, attempts,
                        type(e).__name__, e)
            time.sleep(min(30, 2 ** attempt))
    # rows that failed on the storage service stay open: the next run of this shard retries them
    if not summary["storage_errors"]:
        storage.write_bytes(marker, json.dumps({"key": key, "part": part, "summary": summary}, indent=2).encode())
    return {**summary, "part": part, "skipped": False}


# The skip key covers what a shard's items point at, not only their URIs: the content sha256 of every image
# and mask (storage.sha256), so new bytes under the same URI are computed again. Content rather than S3
# ETag + size or local size + mtime: an ETag is a content hash only for single-part uploads and is not the
# same across S3 implementations, and size + mtime misses a same-size edit that kept its mtime (cp -p,
# rsync -t, tar). The price is reading each image once more, in threads, before the shard is computed (or
# skipped): I/O next to the model's work on every image.
_HASH_THREADS = 16


def _content(shard: str, static_mask: str | None) -> list[list[str]]:
    """[URI, content sha256] of every image and mask the shard's items read (items with a known error
    read nothing); an unreadable file stands as such, so it counts as changed once it can be read."""
    from concurrent.futures import ThreadPoolExecutor

    uris = sorted({u for it in load_items(shard, static_mask) if it.error is None for u in (it.image, it.mask) if u})

    def digest(uri: str) -> str:
        try:
            return storage.sha256(uri)
        except storage.StorageError as e:
            return f"unreadable: {type(e).__name__}"

    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        return [[u, d] for u, d in zip(uris, pool.map(digest, uris))]


# --------------------------------------------------------------------------- merge


class _Part:
    """One part's metadata, schema and (row, image) pairs; the maps stay on storage until written."""

    def __init__(self, uri: str, local: str):
        self.uri, self.local = uri, local
        try:
            pf = pq.ParquetFile(local)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
            raise MergeError(f"part {uri} is not a results file: {e}") from e
        self.schema = pf.schema_arrow
        self.md = res.run_metadata(self.schema)
        if "row" not in self.schema.names or "image" not in self.schema.names:
            raise MergeError(f"part {uri} has no 'row' and 'image' columns: not a camgate results file")
        from .identity import FINGERPRINT_COLUMNS

        t = pf.read(columns=[c for c in FINGERPRINT_COLUMNS if c in self.schema.names])
        self.rows = np.asarray(t.column("row").to_numpy(zero_copy_only=False), dtype=np.int64)
        self.images = t.column("image").to_pylist()
        # one entry per item: a detector's image has a run of rows (one per detection) with its row
        first = np.r_[True, self.rows[1:] != self.rows[:-1]] if len(self.rows) else np.zeros(0, bool)
        self.item_rows = self.rows[first]
        self.keys = t  # what the merged file's data fingerprint is taken over
        # a column with no value at all was typed from nothing (string): the other parts say what it is
        meta = [f.name for f in self.schema if f.name not in res.COLUMNS]
        nulls = pf.read(columns=meta) if meta else None
        self.empty = {c for c in meta if nulls.column(c).null_count == nulls.num_rows}

    @property
    def first(self) -> int:
        return int(self.rows.min()) if len(self.rows) else -1

    @property
    def shard(self) -> str:
        return str(self.md.get("data") or self.uri)


def _ranges_text(rows) -> str:
    rows = sorted(int(r) for r in rows)
    spans, start = [], rows[0]
    for prev, r in zip(rows, rows[1:] + [None]):
        if r != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = r
    more = f" and {len(spans) - _SHOWN} more ranges" if len(spans) > _SHOWN else ""
    return ", ".join(spans[:_SHOWN]) + more


def _common_metadata(parts: list[_Part], data: str | None) -> dict:
    def show(v) -> str:
        return json.dumps(v, sort_keys=True, default=str)[:120]

    from .identity import PROVENANCE, data_fingerprint, manifest_sha256

    first = parts[0]
    mine = res.file_identity(first.md)
    for p in parts[1:]:
        # one run identity (the data fingerprint aside: each part covers its own rows), then the settings
        theirs = res.file_identity(p.md)
        for k in sorted((set(mine) | set(theirs)) - {"data"}):
            if mine.get(k) != theirs.get(k):
                raise MergeError(f"parts {first.uri} and {p.uri} come from different runs: {k!r} is "
                                 f"{show(mine.get(k))} in one and {show(theirs.get(k))} in the other (merge parts "
                                 f"of one model, method and settings)")
        for k in sorted(set(first.md) | set(p.md)):
            if k not in _PER_SHARD + PROVENANCE + (res.IDENTITY_KEY,) and first.md.get(k) != p.md.get(k):
                raise MergeError(f"parts {first.uri} and {p.uri} come from different runs: {k!r} is "
                                 f"{show(first.md.get(k))} in one and {show(p.md.get(k))} in the other (merge parts "
                                 f"of one model, method and settings)")
    md = dict(first.md)
    for k in _PER_SHARD:
        if k in md:
            md[k] = data
    md["shards"] = [p.shard for p in sorted(parts, key=lambda p: p.first)]
    # where and when: the run started with its first shard; each node's environment is kept
    started = [p.md["started_at"] for p in parts if p.md.get("started_at")]
    md["started_at"] = min(started) if started else None
    envs = [p.md.get("environment") for p in parts]
    md["environment"] = envs[0] if all(e == envs[0] for e in envs) else {"per_shard": envs}
    md["data_sha256"] = manifest_sha256(data)
    if isinstance(first.md.get(res.IDENTITY_KEY), dict):  # the merged rows' fingerprint = the one run's
        md[res.IDENTITY_KEY] = {**mine, "data": data_fingerprint(p.keys for p in parts)}
    return md


def _merged_schema(parts: list[_Part], md: dict) -> pa.Schema:
    first = parts[0]
    fields = []
    for f in first.schema:
        typ = None
        for p in parts:
            if f.name not in p.schema.names:
                raise MergeError(f"part {p.uri} has no column {f.name!r}, which {first.uri} has: parts of "
                                 f"different data sets?")
            if f.name in p.empty:
                continue
            t = p.schema.field(f.name).type
            if typ is not None and t != typ:
                raise MergeError(f"column {f.name!r} is {typ} in one part and {t} in {p.uri}: parts of different "
                                 f"data sets?")
            typ = t
        fields.append(pa.field(f.name, typ if typ is not None else f.type))
    extra = [f"{p.uri}: {c}" for p in parts for c in p.schema.names if c not in first.schema.names]
    if extra:
        raise MergeError(f"columns not in {first.uri}: {', '.join(extra[:_SHOWN])}: parts of different data sets?")
    return pa.schema(fields, metadata={res.META_KEY: json.dumps(md, sort_keys=True, default=str).encode()})


def _check_rows(parts: list[_Part], data: str | None) -> list | None:
    """Every row once, nothing foreign; returns the data set's items (None without ``data``)."""
    rows = np.concatenate([p.item_rows for p in parts])
    owner = np.repeat(np.arange(len(parts)), [len(p.item_rows) for p in parts])
    order = np.argsort(rows, kind="stable")
    srt, own = rows[order], owner[order]
    dup = np.nonzero(srt[1:] == srt[:-1])[0]
    if len(dup):
        where = sorted({(int(own[i]), int(own[i + 1])) for i in dup})
        pairs = "; ".join(f"{parts[a].uri} and {parts[b].uri}" if a != b else f"{parts[a].uri} (twice)"
                          for a, b in where[:_SHOWN])
        raise MergeError(f"rows {_ranges_text(set(srt[dup].tolist()))} are in more than one part ({pairs}): "
                         f"a shard merged twice?")
    have = set(srt.tolist())
    items = None
    if data:
        items = load_items(data)
        want = {it.index: it.image for it in items}
        foreign = have - set(want)
        if foreign:
            raise MergeError(f"rows {_ranges_text(foreign)} of the parts are not in data {data} "
                             f"({len(items)} items): parts of another data set?")
        images = {int(r): img for p in parts for r, img in zip(p.rows.tolist(), p.images)}
        wrong = [r for r in sorted(have) if images[r] != want[r]]
        if wrong:
            r = wrong[0]
            raise MergeError(f"{len(wrong)} rows of the parts name other images than data {data}: row {r} is "
                             f"{images[r]} in a part but {want[r]} in the data (parts of another manifest?)")
        missing = set(want) - have
    else:
        missing = set(range(int(srt[-1]) + 1)) - have if len(srt) else set()
        if len(srt) and srt[0] < 0:
            raise MergeError(f"part {parts[int(own[0])].uri} holds row {int(srt[0])}: rows are >= 0")
    absent = _missing_shards(parts)
    if missing or absent:
        what = f"rows {_ranges_text(missing)} are in no part" if missing else ""
        if absent:
            names = ", ".join(absent[:_SHOWN]) + (f" and {len(absent) - _SHOWN} more" if len(absent) > _SHOWN else "")
            what = (what + "; " if what else "") + f"missing shard(s): {names}"
        raise MergeError(f"the parts do not cover {'data ' + data if data else 'the manifest'}: {what}")
    return items


def _positions(parts: list[_Part], items: list | None) -> list[np.ndarray]:
    """Each part's rows' places in the merged file: manifest order. A manifest's own ``row`` column need
    not follow its order, so with the data set a row goes where its item is; without, the parts of one
    :func:`plan` follow their shards' order, each in its own (manifest) order; other parts go by ``row``."""
    if items is not None:
        where = {it.index: i for i, it in enumerate(items)}
        return [np.asarray([where[r] for r in p.rows.tolist()], dtype=np.int64) for p in parts]
    found = [_SHARD.match(p.shard) for p in parts]
    if all(found) and len({(m["base"], m["n"]) for m in found}) == 1:
        start, out = 0, [None] * len(parts)
        for i in sorted(range(len(parts)), key=lambda i: int(found[i]["k"])):
            out[i] = np.arange(start, start + len(parts[i].rows), dtype=np.int64)
            start += len(parts[i].rows)
        return out
    return [p.rows for p in parts]


def _missing_shards(parts: list[_Part]) -> list[str]:
    """Shard manifests (named by :func:`shard_name`) of the parts' plan that no part comes from."""
    found = [m for m in (_SHARD.match(p.shard) for p in parts) if m]
    plans = {(m["base"], int(m["n"])) for m in found}
    if len(found) != len(parts) or len(plans) != 1:
        return []
    (base, n), = plans
    have = {int(m["k"]) for m in found}
    return [f"{base}{shard_name(k, n)}" for k in range(n) if k not in have]


def merge(parts: list[str], out: str, data: str | None = None) -> dict:
    """Part results (of shards) -> one results file at ``out`` in manifest order (see :func:`_positions`).

    Every row must be in exactly one part: rows in two parts, gaps, and (with ``data``) rows or images
    the data set does not have raise :class:`MergeError` naming them (and the missing shards, when the
    parts come from :func:`plan`'s manifests) before anything is written. The parts must come from one
    run configuration; the merged metadata is theirs, with ``data`` (and ``masks_from``) set to
    ``data`` and ``shards`` listing the parts' shard manifests. Returns a summary like ``run``'s.
    """
    if not parts:
        raise MergeError("no parts to merge")
    twice = sorted({u for u in parts if parts.count(u) > 1})
    if twice:
        raise MergeError(f"part {twice[0]} is given more than once")
    with tempfile.TemporaryDirectory(prefix="camgate-merge-") as tmp:
        loaded = []
        for i, uri in enumerate(parts):
            local = storage.local_path(uri)
            if not local:  # fetched once: read for the checks, then again for the rows
                local = posixpath.join(tmp, f"{i:06d}.parquet")
                storage.download(uri, local)
            elif not storage.exists(uri):
                raise MergeError(f"part {uri} not found")
            loaded.append(_Part(uri, local))
        md = _common_metadata(loaded, data)
        schema = _merged_schema(loaded, md)
        pos = _positions(loaded, _check_rows(loaded, data))
        order = sorted(range(len(loaded)), key=lambda i: int(pos[i].min()) if len(pos[i]) else -1)
        loaded, pos = [loaded[i] for i in order], [pos[i] for i in order]
        bounds = [(int(q.min()), int(q.max())) for q in pos if len(q)]
        streamable = all(np.all(np.diff(q) >= 0) for q in pos) and \
            all(a[1] < b[0] for a, b in zip(bounds, bounds[1:]))
        counts = {s: 0 for s in res.STATUSES}
        with storage.atomic_output(out) as path, pq.ParquetWriter(path, schema, compression="zstd") as w:
            tables = (_cast(pq.read_table(p.local), schema) for p in loaded)
            if not streamable:  # interleaved rows (parts split by hand): sort in memory
                t = pa.concat_tables(list(tables))
                tables = [t.take(pa.array(np.argsort(np.concatenate(pos), kind="stable")))]
            for t in tables:
                for s in t.column("status").to_pylist():
                    counts[s] = counts.get(s, 0) + 1
                w.write_table(t)
    return {"out": out, "rows": sum(counts.values()), "counts": counts, "parts": len(parts)}


def _cast(t: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [t.column(f.name) if t.schema.field(f.name).type == f.type or t.column(f.name).null_count < t.num_rows
            else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)
