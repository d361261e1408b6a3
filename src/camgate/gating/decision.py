"""Policy + results (+ ROAD, + champion) -> decision: every rule with its value, threshold and
verdict, and whether the maps were faithful enough to be evidence.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..io.results import RESULT_COLUMNS, STATUSES, read_results
from .policy import DEFAULT_WORSE_BY, RULES, RUN_WIDE, TRUST_RULES, Policy, PolicyError, Rule, load_policy
from .stats import (JUDGED_COLUMNS, MEAN_ABS_TOL, PAIR_COLUMNS, REL_TOL, ROAD_COLUMNS, Frame, baseline_identity,
                    baseline_stats, road_binding, road_stats)

# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class RuleResult:
    rule: str
    scope: str  # 'all' | 'class=<name>' | '<column>=<value>'
    value: float | None
    threshold: float
    op: str  # '<=' | '>='
    verdict: str  # 'pass' | 'fail' | 'skip'
    n: int  # images (basis 'ok') or rows (basis 'rows') behind the value
    params: dict = field(default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "rule": self.rule, "scope": self.scope, "value": _json_float(self.value),
            "threshold": self.threshold, "op": self.op, "verdict": self.verdict, "n": self.n,
            "params": dict(self.params), "reason": self.reason,
        }


@dataclass
class Decision:
    policy: str
    passed: bool
    counts: dict[str, int]
    overall: dict[str, float]
    rules: list[RuleResult]
    scopes: list[dict] = field(default_factory=list)  # stats per class/slice scope evaluated
    # Whether the heatmaps behind the verdict were shown to be faithful (ROAD beats a random map by
    # the policy's margin); None when the policy does not ask.
    trusted: bool | None = None
    trust_reason: str | None = None
    # The champion compared with (gate --baseline): its identity and the paired statistics.
    baseline: dict | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.rules if r.verdict == "fail"]

    def to_dict(self) -> dict:
        """JSON-able (NaN -> None, since NaN is not JSON)."""
        verdicts = [r.verdict for r in self.rules]
        return {
            "policy": self.policy,
            "passed": self.passed,
            "counts": dict(self.counts),
            "overall": {k: _json_float(v) for k, v in self.overall.items()},
            "summary": {"rules": len(verdicts), **{v: verdicts.count(v) for v in ("pass", "fail", "skip")}},
            "rules": [r.to_dict() for r in self.rules],
            "scopes": [{k: _json_float(v) for k, v in s.items()} for s in self.scopes],
            "trusted": self.trusted,
            "trust_reason": self.trust_reason,
            "baseline": None if self.baseline is None else {k: _json_float(v) for k, v in self.baseline.items()},
            "warnings": list(self.warnings),
        }


def _json_float(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _judge(rule: Rule, stats: dict, scope: str, min_ok: int) -> RuleResult:
    op, key, basis, _ = RULES[rule.name]
    key = key.format(**rule.params)  # a sanity rule's statistic depends on its measure
    n = {"ok": stats["ok"], "rows": stats["rows"], "road": stats.get("road_images", 0),
         "sanity": stats.get("sanity_images", 0), "paired": stats.get("baseline_compared", 0),
         "judged": stats.get(f"{key.removeprefix('mean_')}_images", 0)}[basis]
    value = float(stats.get(key, math.nan)) if rule.name != "min_images" else stats["ok"]
    res = dict(rule=rule.name, scope=scope, threshold=rule.threshold, op=op, n=n, params=rule.params)
    if rule.name != "min_images":
        if basis == "rows" and n == 0:
            return RuleResult(value=None, verdict="skip", reason="no rows in scope", **res)
        if basis == "road" and n == 0:
            return RuleResult(value=None, verdict="fail", reason=stats.get("road_reason") or "no ROAD scores", **res)
        if basis == "sanity" and n == 0:
            return RuleResult(value=None, verdict="fail", reason=stats.get("sanity_reason") or "no sanity checks "
                              "(camgate road --sanity, then gate --road)", **res)
        if basis == "judged" and key not in stats:
            return RuleResult(value=None, verdict="fail", reason=f"the results have no "
                              f"{key.removeprefix('mean_')} column (written by camgate run and analyze)", **res)
        if basis == "paired" and "baseline_compared" not in stats:  # a first model has no champion
            return RuleResult(value=None, verdict="skip", reason="no baseline (champion) results given", **res)
        if basis == "paired" and n == 0:
            return RuleResult(value=None, verdict="fail", reason="no image is ok in both the results and the baseline",
                              **res)
        if basis in ("ok", "judged") and stats["ok"] < min_ok:
            why = "no ok images in scope" if stats["ok"] == 0 else f"{stats['ok']} ok images < {min_ok}"
            return RuleResult(value=None, verdict="skip", reason=why, **res)
        if basis == "judged" and n == 0:
            return RuleResult(value=None, verdict="skip", reason=f"no ok image has both valid and invalid pixels: "
                              f"{key.removeprefix('mean_')} is undefined on an empty or full mask", **res)
        if math.isnan(value):
            return RuleResult(value=value, verdict="fail",
                              reason="value is NaN: missing per-image values among ok rows", **res)
    slack = MEAN_ABS_TOL if key.startswith("mean_") else 0.0
    close = math.isclose(value, rule.threshold, rel_tol=REL_TOL, abs_tol=slack)
    ok = close or (value <= rule.threshold if op == "<=" else value >= rule.threshold)
    return RuleResult(value=value, verdict="pass" if ok else "fail", **res)


def _trust_reason(v: RuleResult) -> str:
    """One trust rule's verdict in words."""
    measure = {"spearman": "Spearman", "ssim": "SSIM"}.get(v.params.get("measure", ""), "")
    subject = {"faithfulness": "ROAD's margin over a random map",
               "randomised_similarity": f"{measure} similarity of the maps to the fully randomised model's",
               "random_logit_similarity": f"{measure} similarity of the maps to another class's"}[v.rule]
    if v.value is None:
        return f"{subject}: {v.reason}"
    return f"{subject} is {v.value:.3f} ({'' if v.verdict == 'pass' else 'not '}{v.op} {v.threshold:g})"


def evaluate(results: pa.Table | str | os.PathLike, policy: Policy | Mapping | str | os.PathLike,
             road=None, baseline=None) -> Decision:
    """Apply ``policy`` to a results table (or Parquet path/URI) and decide pass/fail.

    ``road``: ROAD results (table or URI) for the ``faithfulness`` rule; the decision is then marked
    ``trusted`` or not, with the reason. A ROAD file of other maps than the results' (another model,
    method, target, layer or images) is refused (:class:`camgate.errors.IdentityError`). ``baseline``:
    the champion's results on the same data, for the baseline rules (the decision then names the
    champion and the paired statistics; a champion measured differently is a warning)."""
    policy = load_policy(policy)
    table = read_results(results, RESULT_COLUMNS + JUDGED_COLUMNS + ("target_layer", "image_sha256", "mask_sha256")
                         + policy.slices)
    missing = [s for s in policy.slices if s not in table.column_names]
    if missing:
        raise PolicyError(f"{policy.source}: slices: column {missing[0]!r} not in results")
    frame = Frame.of(table)
    ratio = policy.share_ratio
    overall = frame.stats(np.ones(frame.n, dtype=bool), ratio)
    trust_rules = [r for r in policy.rules if r.name in TRUST_RULES]
    road_name = road if isinstance(road, (str, os.PathLike)) else None
    if trust_rules or road is not None:
        layers = (table.column("target_layer").drop_null().unique().to_pylist()
                  if "target_layer" in table.column_names else [])
        if road is not None:
            road = read_results(road, ROAD_COLUMNS)  # read once: the binding, then the scores
            road_binding(table, road, name=str(road_name) if road_name is not None else None)
        overall.update(road_stats(road, layers[0] if len(layers) == 1 else None))
    ident, warnings = None, []
    if baseline is not None:
        from ..io.results import run_metadata

        worse = policy.rule("baseline_share_worse")
        base_table = read_results(baseline, PAIR_COLUMNS)  # read once: pairs and metadata
        name = str(baseline) if isinstance(baseline, (str, os.PathLike)) else None
        overall.update(baseline_stats(table, base_table, worse.params["by"] if worse else DEFAULT_WORSE_BY, name))
        ident, warnings = baseline_identity(run_metadata(table), run_metadata(base_table), baseline)
        ident.update({k: v for k, v in overall.items() if k.startswith("baseline_")})
        if overall["baseline_unpaired"]:
            warnings.append(f"{overall['baseline_unpaired']} of {frame.n} result rows have no baseline row "
                            f"for the same image: the comparison covers the other {overall['baseline_paired']}")
        if overall["baseline_other_masks"]:
            warnings.append(f"{overall['baseline_other_masks']} of the {overall['baseline_paired']} paired images "
                            f"were measured with other mask content by the baseline (mask_sha256 differs): their "
                            f"ratio changes may come from the masks")
    rules = [_judge(r, overall, "all", 1) for r in policy.rules]
    trusted = reason = None
    if trust_rules:
        verdicts = [r for r in rules if r.rule in TRUST_RULES]
        trusted = all(v.verdict == "pass" for v in verdicts)
        reason = "; ".join(_trust_reason(v) for v in verdicts)
        if not trusted:
            reason += ": a verdict on heatmaps that do not show what the model uses is not evidence"

    scoped = [r for r in policy.rules if r.name not in RUN_WIDE]
    groupings: list[tuple[str, str]] = []
    if policy.per_class:
        groupings.append((policy.per_class, "class"))
    groupings += [(s, s) for s in policy.slices]
    scopes = []
    for by, prefix in groupings:
        for shown, mask in frame.groups(by):
            scope = f"{prefix}={shown}"
            stats = frame.stats(mask, ratio)
            scopes.append({"scope": scope, **stats})
            # A predicted-class scope holds no error rows by construction: rates over rows say nothing.
            for r in scoped:
                if by == "predicted" and RULES[r.name][2] == "rows":
                    continue
                rules.append(_judge(r, stats, scope, policy.min_scope_images))

    counts = {k: overall[k] for k in ("rows", *STATUSES) if k in overall}
    metrics = {k: v for k, v in overall.items() if k not in counts and k not in ("road_reason", "sanity_reason")}
    return Decision(policy.name, all(r.verdict != "fail" for r in rules), counts, metrics, rules, scopes,
                    trusted, reason, ident, warnings)


def gate(results_uri: str | os.PathLike | pa.Table, policy_uri: Policy | Mapping | str | os.PathLike,
         road=None, baseline=None) -> Decision:
    """Load the policy (first: a bad policy fails fast, before reading results) and evaluate."""
    return evaluate(results_uri, load_policy(policy_uri), road, baseline)
