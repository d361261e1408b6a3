"""What a run's file records beyond its settings: the run identity (what its numbers depend on,
with the data fingerprint), provenance (where and when, the manifest's hash) and the resume
fingerprint (settings, model hashes and the items themselves).

The run identity is built here and only here, for every file camgate writes (results, heatmaps,
parts, layers, ROAD); consumers read it with :func:`camgate.io.results.file_identity` and compare it
field by field. Its data fingerprint names the data by content, prefix data sets included: sha256
over the concatenation, in ``row`` order, of one sha256 per image of
``[row, image URI, image sha256, mask URI, mask sha256]`` (JSON). The content hashes are taken of
the bytes the run read anyway (None where a file was not read: a heatmaps file's masks, an image that
failed); a file with several rows per image (layers, ROAD) counts each image once. A per-image digest
folded in row order lets a merge recompute the fingerprint of its parts' rows and get the one-run
value.
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array

import torch

from ..data.manifest import MANIFEST_FORMATS, Item
from ..io import storage
from ..io.results import IDENTITY_KEY
from ..model.load import LoadedModel

PROVENANCE = ("environment", "started_at", "data_sha256")  # the keys provenance adds
TASK = "classification"  # the only task so far; model cards will name theirs
FINGERPRINT_COLUMNS = ("row", "image", "image_sha256", "mask", "mask_sha256")
# what the comparisons look at: the model, what was explained and how, and how masks were read
MODEL_FIELDS = ("task", "model_card_sha256", "weights_sha256")
MASK_FIELDS = ("static_mask", "mask_spec", "topk")


def run_identity(lm: LoadedModel, *, method: str, target, layers, static_mask: str | None = None,
                 mask_spec=None, topk: float | None = None, budget: int | None = None, seed: int | None = None,
                 **extra) -> dict:
    """The identity of a run's file, less its ``data`` fingerprint (which :class:`DataFingerprint`
    adds once the rows are written). ``layers``: the target layer(s), or every layer of a layers or
    ROAD file; ``budget``/``seed``: black-box methods only (None otherwise); mask settings None where
    the file reads no masks; ``extra``: what else a file's numbers depend on (ROAD: its scoring)."""
    return {"task": getattr(lm.card, "task", None) or TASK,
            "model_card_sha256": lm.card.sha256 or None, "weights_sha256": lm.weights_sha256 or None,
            "method": method, "target": str(target), "target_layer": list(layers),
            "static_mask": static_mask, "mask_spec": None if mask_spec is None else mask_spec.to_dict(),
            "topk": topk, "budget": None if budget is None else int(budget),
            "seed": None if seed is None else int(seed), **extra, "data": None}


def with_masks(ident: dict, *, static_mask: str | None, mask_spec, topk: float) -> dict:
    """A heatmaps file's identity for the results ``analyze`` makes of it with these mask settings."""
    return {**ident, "static_mask": static_mask, "mask_spec": mask_spec.to_dict(), "topk": topk, "data": None}


def _row_digest(row, image, image_sha256, mask, mask_sha256) -> bytes:
    return hashlib.sha256(json.dumps([row, image, image_sha256, mask, mask_sha256]).encode()).digest()


class DataFingerprint:
    """The data fingerprint of the rows of a file, fed table by table (any order), and the identity
    it completes: a :class:`camgate.io.results.ResultsWriter` tracker."""

    def __init__(self, identity: dict | None = None):
        self.identity = identity or {}
        self._rows = array("q")
        self._digests: list[bytes] = []

    def add(self, table) -> None:
        n = table.num_rows
        cols = [table.column(c).to_pylist() if c in table.column_names else [None] * n for c in FINGERPRINT_COLUMNS]
        for values in zip(*cols):
            self._rows.append(-1 if values[0] is None else int(values[0]))
            self._digests.append(_row_digest(*values))

    def result(self) -> dict:
        """``{"fingerprint": sha256 hex, "rows": images}``."""
        seen = sorted(set(zip(self._rows, self._digests)))
        return {"fingerprint": hashlib.sha256(b"".join(d for _, d in seen)).hexdigest(), "rows": len(seen)}

    def metadata(self) -> dict:
        return {IDENTITY_KEY: {**self.identity, "data": self.result()}}


def data_fingerprint(tables) -> dict:
    """The data fingerprint of the rows of these tables (see the module text)."""
    fp = DataFingerprint()
    for t in tables:
        fp.add(t)
    return fp.result()


def provenance(lm: LoadedModel, data: str) -> dict:
    """What a test record needs beyond the settings: when and where the maps were computed and the
    manifest's hash. Kept out of the resume fingerprint: a run resumed elsewhere is the same run."""
    import datetime
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(lm.device),
           "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
           "cudnn_deterministic": torch.backends.cudnn.deterministic,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if lm.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(lm.device)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"environment": env, "started_at": now.isoformat(timespec="seconds"),
            "data_sha256": manifest_sha256(data)}


def manifest_sha256(data) -> str | None:
    """sha256 of a manifest file; None for a prefix data set (no single file: its items are in the
    results) or a file that cannot be read."""
    if not data or os.path.splitext(str(data).rstrip("/"))[1].lower() not in MANIFEST_FORMATS:
        return None
    return storage.sha256_or_none(str(data))


def fingerprint(md: dict, items: list[Item]) -> str:
    """Everything that determines the rows: run settings, model hashes and the items themselves."""
    h = hashlib.sha256(json.dumps(md, sort_keys=True, default=str).encode())
    for it in items:
        # ground-truth boxes / label maps decide a detector's / segmentation model's rows (absent otherwise:
        # earlier runs keep their fingerprint)
        boxes = [] if it.boxes is None else [it.boxes]
        regions = [] if it.regions is None else [{"regions": it.regions}]
        h.update(json.dumps([it.index, it.image_id, it.image, it.mask, it.label, it.meta, it.error, *boxes, *regions],
                            sort_keys=True, default=str).encode())
    return h.hexdigest()
