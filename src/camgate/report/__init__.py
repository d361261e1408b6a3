"""What a gate run leaves behind: the decision, a report a reviewer reads (HTML, Markdown), the test
record an auditor files, JUnit XML for CI, and a few scalars for KFP Metrics.

:func:`artifacts` makes them all from one decision; the CLI's ``gate``/``report`` verbs and the KFP
gate step both call it, so every path leaves the same files.
"""
from __future__ import annotations

import hashlib
import json

from . import record
from .junit import junit
from .metrics import MAX_METRICS, metrics
from .overlays import overlay_png, overlays
from .render import GALLERY, html, markdown

__all__ = ["artifacts", "html", "markdown", "metrics", "junit", "overlays", "overlay_png", "record", "MAX_METRICS",
           "FILES", "GALLERY"]

FILES = ("decision.json", "record.json", "junit.xml", "summary.md", "report.html")


def artifacts(results, policy, road=None, baseline=None, title: str | None = None, images: bool = True):
    """Decide and render: ``(decision, {file name: bytes})`` with the names in :data:`FILES`.

    The report carries the record's sha256, so a filed report and record can be checked to belong
    together."""
    from ..gating.decision import gate

    started = record._now()
    decision = gate(results, policy, road=road, baseline=baseline)
    rec = record.build(decision, results, policy, road=road, baseline=baseline, started_at=started)
    body = record.dumps(rec)
    sha = hashlib.sha256(body).hexdigest()
    ctx = {"record": rec, "record_sha256": sha, "baseline": baseline, "road": road}
    pics = overlays(results) if images and isinstance(results, str) else None
    files = {
        "decision.json": (json.dumps(decision.to_dict(), indent=2) + "\n").encode(),
        "record.json": body,
        "junit.xml": junit(decision, record=rec),
        "summary.md": markdown(decision, results, title=title, context=ctx).encode(),
        "report.html": html(decision, results, title=title, images=pics, context=ctx).encode(),
    }
    return decision, files
