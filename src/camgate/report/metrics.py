"""A gate decision as a few flat scalars for KFP Metrics.

KFP's compare view lines runs up by metric name, so the set is small and fixed (at most
:data:`MAX_METRICS`): the decision, counts, the ratio's mean and p95, ROAD, sanity and baseline figures when
given, and one margin per run-wide rule (positive = headroom, negative = by how much it failed).
Class and slice scopes stay in the report and the record, or the list would grow with the data.
"""
from __future__ import annotations

import math

from ..gating.decision import Decision

MAX_METRICS = 36
_COUNTS = {"rows": "n_images", "ok": "n_ok", "no_activation": "n_no_activation", "error": "n_error"}
_OVERALL = ("mean_invalid_activation_ratio", "p95_invalid_activation_ratio", "mean_invalid_area_ratio",
            "error_rate", "no_activation_rate", "faithfulness_margin", "baseline_mean", "baseline_mean_increase",
            "baseline_share_worse", "mean_randomised_spearman", "mean_random_logit_spearman")


def margin(rule) -> float | None:
    """How far a rule's value is inside its limit (negative: outside), or None without a value."""
    if rule.value is None or not math.isfinite(rule.value):
        return None
    return rule.threshold - rule.value if rule.op == "<=" else rule.value - rule.threshold


def metrics(decision: Decision) -> dict[str, float]:
    """Flat scalars; non-finite values are dropped (KFP rejects NaN)."""
    verdicts = [r.verdict for r in decision.rules]
    out = {"passed": 1.0 if decision.passed else 0.0}
    if decision.trusted is not None:
        out["trusted"] = 1.0 if decision.trusted else 0.0
    out.update({name: float(decision.counts[k]) for k, name in _COUNTS.items()})
    out.update(n_rules_failed=float(verdicts.count("fail")), n_rules_skipped=float(verdicts.count("skip")))
    for k in _OVERALL:
        v = decision.overall.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    for r in decision.rules:
        m = margin(r) if r.scope == "all" else None
        if m is not None:
            out[f"margin_{r.rule}"] = float(m)
    return {k: v for k, v in out.items() if math.isfinite(v)}
