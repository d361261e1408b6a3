"""The test record (``record.json``): what an auditor files for one gate run.

EU AI Act Annex IV §2(g) asks for the validation and testing procedures, the test data, the metrics,
and test logs and reports dated and signed by the responsible persons. The record holds the first
four with hashes of every file they came from; the signature is left for people (``approval``).
Versioned by ``schema``: readers check it before trusting the field names.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

from .. import __version__
from ..gating.decision import Decision
from ..gating.policy import load_policy
from ..io import storage
from ..io.results import read_results
from . import detection
from .evidence import requirements

SCHEMA = "camgate.test-record/1"
APPROVAL_FIELDS = ("name", "role", "date", "decision", "signature", "comment")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _file(uri) -> dict | None:
    if uri is None:
        return None
    return {"uri": str(uri) if isinstance(uri, (str, os.PathLike)) else None, "sha256": storage.sha256_or_none(uri)}


def _map_resolution(results) -> list[int] | None:
    t = read_results(results, ("status", "cam_height", "cam_width"))
    if "cam_height" not in t.column_names:
        return None
    df = t.to_pandas()
    df = df[df["status"] != "error"].dropna(subset=["cam_height", "cam_width"])
    if df.empty:
        return None
    h, w = df[["cam_height", "cam_width"]].value_counts().idxmax()  # maps of one model share a size
    return [int(h), int(w)]


def build(decision: Decision, results, policy, road=None, baseline=None, started_at: str | None = None) -> dict:
    """The record of one decision. ``results``/``road``/``baseline``: what the gate read (URIs are
    hashed); ``policy``: its source (URI or mapping); ``started_at``: when the gate started."""
    from ..io.results import SANITY_SIMILARITIES, file_identity, run_metadata
    from ..runner.identity import manifest_sha256

    light = read_results(results, ("row", "status", "det_index", "predicted_class", "predicted_label"))
    md = run_metadata(light)
    # a detection run: one row per detection, so the record counts images and detections apart
    det = detection.summary(light) if detection.is_detection(light) else None
    # segmentation / multi-label: one row per (image, class) explained
    per_class = detection.class_task(light)
    objects = detection.class_summary(light, per_class) if per_class else None
    ident = file_identity(md)
    model = md.get("model") or {}
    pol = load_policy(policy)
    pol_file = _file(policy if isinstance(policy, (str, os.PathLike)) else None)
    data = md.get("data")
    env = dict(md.get("environment") or {})
    env["gate"] = {"python": platform.python_version(), "platform": platform.platform(), "camgate": __version__}
    road_summary = None
    if road is not None or decision.trusted is not None:
        road_summary = {"trusted": decision.trusted, "reason": decision.trust_reason,
                        **{k: decision.overall.get(k) for k in ("road_images", "road_mean", "road_random_mean",
                                                                "faithfulness_margin")},
                        "file": _file(road)}
    d = decision.to_dict()
    sanity = None
    if decision.overall.get("sanity_images") or any("measure" in r.params for r in decision.rules):
        checked = run_metadata(read_results(road, ("row",))).get("sanity") if road is not None else None
        sanity = {"checked": checked, "images": decision.overall.get("sanity_images", 0),
                  **{f"mean_{c}": d["overall"].get(f"mean_{c}") for c in SANITY_SIMILARITIES}}
    # the data as far as the results prove it: the manifest's hash only where there is a manifest file
    # (not for a prefix data set, nor for parts merged without one), the fingerprint where the run took it
    data_rec: dict = {"manifest": data}
    manifest_sha = md.get("data_sha256") or manifest_sha256(data)
    if manifest_sha:
        data_rec["manifest_sha256"] = manifest_sha
    fp = ident.get("data") if isinstance(ident.get("data"), dict) else {}
    if fp.get("fingerprint"):
        data_rec.update(fingerprint=fp["fingerprint"], fingerprint_images=fp.get("rows"))
    data_rec["counts"] = dict(decision.counts)
    if det:
        data_rec["counts"].update({k: det[k] for k in ("rows", *detection.STATUSES)})
    if objects:
        data_rec["counts"].update({k: v for k, v in objects.items() if k not in ("task", "classes", "images")})
    return {
        "schema": SCHEMA,
        "camgate_version": __version__,
        **({"task": detection.TASK, "detection": det} if det else {}),
        **({"task": per_class, per_class: objects} if objects else {}),
        "verdict": {"passed": decision.passed, "trusted": decision.trusted, "trust_reason": decision.trust_reason,
                    "summary": d["summary"], "warnings": d["warnings"]},
        "model": {"name": model.get("name"), "arch": model.get("arch"), "kind": model.get("kind", "torch"),
                  "card_sha256": md.get("model_card_sha256") or model.get("card_sha256"),
                  "weights_sha256": md.get("weights_sha256") or model.get("weights_sha256"),
                  "classes": model.get("classes")},
        "data": data_rec,
        "identity": ident or None,
        "method": {"name": md.get("method"), "target": md.get("target"), "target_layer": md.get("target_layer"),
                   "map_resolution": _map_resolution(results), "static_mask": md.get("static_mask"),
                   "mask_spec": md.get("mask_spec"), "topk": md.get("topk"),
                   **({"budget": md["budget"], "seed": md.get("seed")} if "budget" in md else {})},
        "policy": {**(pol_file or {"uri": None, "sha256": None}), "name": pol.name, "rules": pol.to_dict()["rules"],
                   "per_class": pol.per_class or False, "slices": list(pol.slices)},
        "rules": d["rules"],
        "overall": d["overall"],
        "baseline": d["baseline"],
        "road": road_summary,
        "sanity": sanity,
        "files": {"results": _file(results if isinstance(results, (str, os.PathLike)) else None),
                  "baseline": _file(baseline), "road": _file(road)},
        "environment": env,
        "times": {"heatmaps_started_at": md.get("started_at"), "gate_started_at": started_at,
                  "gate_finished_at": _now()},
        "requirements": requirements(decision, md, data_rec, detection=det),
        "approval": {k: None for k in APPROVAL_FIELDS},
    }


def dumps(record: dict) -> bytes:
    """The record's bytes: what is written, and what its sha256 in the report is taken over."""
    return (json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
