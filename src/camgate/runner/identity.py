"""What a run's file records beyond its settings: provenance (where and when, the manifest's hash)
and the resume fingerprint (settings, model hashes and the items themselves).
"""
from __future__ import annotations

import os

import torch

from ..data.manifest import Item
from ..io import storage
from ..model.load import LoadedModel

PROVENANCE = ("environment", "started_at", "data_sha256")  # the keys provenance adds


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
    from ..data.manifest import MANIFEST_FORMATS

    if not data or os.path.splitext(str(data).rstrip("/"))[1].lower() not in MANIFEST_FORMATS:
        return None
    return storage.sha256_or_none(str(data))


def fingerprint(md: dict, items: list[Item]) -> str:
    """Everything that determines the rows: run settings, model hashes and the items themselves."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(md, sort_keys=True, default=str).encode())
    for it in items:
        h.update(json.dumps([it.index, it.image_id, it.image, it.mask, it.label, it.meta, it.error],
                            sort_keys=True, default=str).encode())
    return h.hexdigest()
