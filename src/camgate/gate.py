"""Policy -> pass/fail decision over a results Parquet.

A policy is a small YAML file (local path or s3://)::

    name: no-shortcuts
    rules:
      mean_invalid_activation_ratio: {max: 0.30}   # mean ratio over status=='ok' images
      share_images_over: {ratio: 0.5, max: 0.10}    # share of ok images whose ratio > 0.5
      peak_in_invalid_rate: {max: 0.20}             # share of ok images peaking in the invalid region
      mean_excess_over_area: {max: 0.05}            # mean(ratio - invalid_area_ratio) over ok images
      no_activation_rate: {max: 0.05}               # share of rows with status=='no_activation'
      error_rate: {max: 0.0}                        # share of rows with status=='error'
      min_images: 20                                # fewer ok images in the whole run -> fail
      faithfulness: {min_margin: 0.05}              # ROAD - random-map ROAD (gate --road)
      baseline_mean_increase: {max: 0.02}           # mean ratio - the champion's (gate --baseline)
      baseline_share_worse: {by: 0.05, max: 0.10}   # share of images whose ratio rose by > 0.05
    per_class: predicted      # false (default) | true = predicted | predicted | label
    slices: [camera]          # metadata columns: rules also apply per value
    min_scope_images: 5       # class/slice scopes with fewer ok images are skipped (default 1)

Defaults: a rule left out is not checked, except ``error_rate`` (default ``max: 0.0``: every
image must be judged), ``no_activation_rate`` (default ``max: 0.05``: at most 5 % all-zero maps) and
``min_images`` (default ``1``: an empty run never passes). Set any of them to ``null`` to turn it off. ``{max: x}`` may be written as a bare number. ``min_images`` applies to the
whole run only; in class/slice scopes ``min_scope_images`` decides whether a scope is judged at all,
so a rarely predicted class is skipped (with a reason) rather than failing the gate on no evidence.

Comparisons are inclusive (``value <= max`` passes). Means of per-image numbers get 1e-6 absolute
slack (the results may hold float32: 0.3 is stored as 0.30000001); rates of counts get only 1e-9
relative slack, so ``error_rate: {max: 0.0}`` stays strict however many rows there are. A NaN
value with images behind it fails: a missing per-image number must never pass silently. Rules over
rows (error/no-activation rates) are not applied to predicted-class scopes, which hold no error
rows by construction.

Baseline rules compare with the champion's results on the same data, paired by ``row`` and
``image`` over the images that are ok in both runs. Without a baseline they are skipped with that
reason (a first model has no champion); a baseline sharing no image with the results is refused, and
one computed with another method, layer or mask setting is compared but warned about.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from .errors import ConfigError

STATUSES = ("ok", "no_activation", "error")

# name -> (op, statistic key, basis, allowed threshold range). basis 'ok': judged over ok images;
# 'rows': over all rows of the scope.
RULES: dict[str, tuple[str, str, str, tuple[float, float]]] = {
    "min_images": (">=", "ok", "ok", (0, math.inf)),
    "error_rate": ("<=", "error_rate", "rows", (0.0, 1.0)),
    "no_activation_rate": ("<=", "no_activation_rate", "rows", (0.0, 1.0)),
    "mean_invalid_activation_ratio": ("<=", "mean_invalid_activation_ratio", "ok", (0.0, 1.0)),
    "share_images_over": ("<=", "share_images_over", "ok", (0.0, 1.0)),
    "peak_in_invalid_rate": ("<=", "peak_in_invalid_rate", "ok", (0.0, 1.0)),
    "mean_excess_over_area": ("<=", "mean_excess_over_area", "ok", (-1.0, 1.0)),
    # over the images of a ROAD file (`camgate road`): mean(road - road_random), run-wide only
    "faithfulness": (">=", "faithfulness_margin", "road", (-1.0, 1.0)),
    # against a baseline (champion) results file of the same images (gate --baseline), run-wide only,
    # over the images that are ok in both runs, paired by row and image
    "baseline_mean_increase": ("<=", "baseline_mean_increase", "paired", (-1.0, 1.0)),
    "baseline_share_worse": ("<=", "baseline_share_worse", "paired", (0.0, 1.0)),
}
RUN_WIDE = ("min_images", "faithfulness", "baseline_mean_increase", "baseline_share_worse")
DEFAULT_SHARE_RATIO = 0.5
DEFAULT_WORSE_BY = 0.05  # baseline_share_worse: a ratio rise above this counts as "worse"
# Settings that make two runs' ratios comparable; a baseline that differs in one gets a warning.
_COMPARABLE = ("method", "target", "target_layer", "static_mask", "mask_spec", "topk")
# Checked unless the policy sets them to null: every image must be judged; an all-zero map is
# no evidence either way, and a few are normal for Grad-CAM (its channel weights can all be
# negative for a class), but a run of them must not pass on what the other maps say; and an empty
# run never passes.
DEFAULT_RULES = {"error_rate": {"max": 0.0}, "no_activation_rate": {"max": 0.05}, "min_images": 1}
_PARAMS = {"share_images_over": {"ratio": DEFAULT_SHARE_RATIO}, "baseline_share_worse": {"by": DEFAULT_WORSE_BY}}
_POLICY_KEYS = {"name", "description", "rules", "per_class", "slices", "min_scope_images"}
_REL_TOL = 1e-9
_MEAN_ABS_TOL = 1e-6  # well below any meaningful threshold, above float32 storage error

# Columns evaluate() and the reports read; `cam` is deliberately absent (it is the bulk of the file).
RESULT_COLUMNS = (
    "row", "image_id", "image", "status", "error", "label", "predicted_class", "predicted_label",
    "invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid",
)
_REQUIRED = ("status", "invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid")


class PolicyError(ConfigError):
    """The policy is unreadable or invalid; the message names the file and the key."""


class ResultsError(ConfigError):
    """The results table lacks a column or holds values outside the results contract."""


class BaselineError(ResultsError):
    """The baseline results cannot be compared with the results (no image in common)."""


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Rule:
    name: str
    threshold: float
    op: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    per_class: str | None = None  # None | 'predicted' | 'label'
    slices: tuple[str, ...] = ()
    min_scope_images: int = 1
    description: str = ""
    source: str = "<dict>"

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    @property
    def share_ratio(self) -> float:
        r = self.rule("share_images_over")
        return r.params["ratio"] if r else DEFAULT_SHARE_RATIO

    def to_dict(self) -> dict:
        """Normalised form (defaults filled in): recordable in Parquet metadata, reloadable."""
        rules: dict[str, Any] = {}
        for r in self.rules:
            bound = "min_margin" if r.name == "faithfulness" else "max"
            rules[r.name] = r.threshold if r.name == "min_images" else {bound: r.threshold, **r.params}
        for name in DEFAULT_RULES:  # keep explicit opt-outs explicit
            rules.setdefault(name, None)
        return {
            "name": self.name,
            "description": self.description,
            "rules": rules,
            "per_class": self.per_class or False,
            "slices": list(self.slices),
            "min_scope_images": self.min_scope_images,
        }


def load_policy(source: Policy | Mapping | str | os.PathLike) -> Policy:
    """Policy from a mapping, a local YAML path or an s3:// URI.

    Storage failures on URIs propagate as the storage module's own error, so a caller can tell
    "could not fetch" from "fetched but invalid" (:class:`PolicyError`).
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _parse_policy(source, "<dict>")
    where = str(source)
    data = _read_source(where, PolicyError, "policy")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PolicyError(f"{where}: not valid YAML: {e}") from None
    if doc is None:
        raise PolicyError(f"{where}: policy is empty")
    if not isinstance(doc, Mapping):
        raise PolicyError(f"{where}: policy must be a mapping, got {type(doc).__name__}")
    default_name = Path(where.rstrip("/").rsplit("/", 1)[-1]).stem or "policy"
    return _parse_policy(doc, where, default_name)


def _parse_policy(doc: Mapping, where: str, default_name: str = "policy") -> Policy:
    def fail(key: str, msg: str):
        raise PolicyError(f"{where}: {key}: {msg}")

    unknown = sorted(set(map(str, doc)) - _POLICY_KEYS)
    if unknown:
        fail(unknown[0], f"unknown key (expected one of {sorted(_POLICY_KEYS)})")

    name = doc.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        fail("name", f"must be a non-empty string, got {name!r}")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        fail("description", "must be a string")

    raw_rules = doc.get("rules") or {}
    if not isinstance(raw_rules, Mapping):
        fail("rules", f"must be a mapping of rule name -> threshold, got {type(raw_rules).__name__}")
    unknown = sorted(set(map(str, raw_rules)) - set(RULES))
    if unknown:
        fail(f"rules.{unknown[0]}", f"unknown rule (expected one of {list(RULES)})")
    specs = {**DEFAULT_RULES, **raw_rules}

    rules = []
    for rname, (op, _, _, (lo, hi)) in RULES.items():  # fixed order -> stable decision output
        spec = specs.get(rname)
        if spec is None:
            continue
        key = f"rules.{rname}"
        if rname == "min_images":
            if isinstance(spec, Mapping):
                _only_keys(spec, {"min"}, key, fail)
                spec = spec.get("min")
                key += ".min"
            if isinstance(spec, bool) or not isinstance(spec, int) or spec < 0:
                fail(key, f"must be a non-negative integer, got {spec!r}")
            rules.append(Rule(rname, int(spec), op))
            continue
        params = {}
        bound = "min_margin" if rname == "faithfulness" else "max"
        if not isinstance(spec, Mapping):
            spec = {bound: spec}
        allowed = {bound, *_PARAMS.get(rname, {})}
        _only_keys(spec, allowed, key, fail)
        if bound not in spec:
            fail(f"{key}.{bound}", "missing")
        threshold = _number(spec[bound], lo, hi, f"{key}.{bound}", fail)
        for pname, default in _PARAMS.get(rname, {}).items():
            params[pname] = _number(spec.get(pname, default), 0.0, 1.0, f"{key}.{pname}", fail)
        rules.append(Rule(rname, threshold, op, params))

    per_class = doc.get("per_class", False)
    if per_class is True:
        per_class = "predicted"
    if per_class is False or per_class is None:
        per_class = None
    elif per_class not in ("predicted", "label"):
        fail("per_class", f"must be true, false, 'predicted' or 'label', got {per_class!r}")

    slices = doc.get("slices") or []
    if isinstance(slices, str):
        slices = [slices]
    if not isinstance(slices, list) or not all(isinstance(s, str) and s for s in slices):
        fail("slices", f"must be a list of column names, got {slices!r}")

    min_scope = doc.get("min_scope_images", 1)
    if isinstance(min_scope, bool) or not isinstance(min_scope, int) or min_scope < 1:
        fail("min_scope_images", f"must be a positive integer, got {min_scope!r}")

    return Policy(name.strip(), tuple(rules), per_class, tuple(slices), min_scope, description, where)


def _only_keys(spec: Mapping, allowed: set, key: str, fail) -> None:
    extra = sorted(set(map(str, spec)) - allowed)
    if extra:
        fail(f"{key}.{extra[0]}", f"unknown key (expected one of {sorted(allowed)})")


def _number(v: Any, lo: float, hi: float, key: str, fail) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        fail(key, f"must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


# --------------------------------------------------------------------------- results


def _read_source(where: str, error: type[Exception], what: str) -> bytes:
    if where.startswith("file://"):
        where = where[len("file://"):]
    if "://" in where:
        from . import storage  # only URIs need the S3 client

        return storage.read_bytes(where)
    try:
        return Path(where).read_bytes()
    except OSError as e:
        raise error(f"{where}: cannot read {what}: {e.strerror or e}") from None


def read_results(results: pa.Table | str | os.PathLike, columns=RESULT_COLUMNS) -> pa.Table:
    """The requested columns that exist, from a table, a local Parquet path or a URI."""
    columns = list(dict.fromkeys(columns))
    if isinstance(results, pa.Table):
        return results.select([c for c in columns if c in results.column_names])
    where = str(results)
    local = where[len("file://"):] if where.startswith("file://") else where
    try:
        if "://" not in local:
            names = pq.read_schema(local).names
            return pq.read_table(local, columns=[c for c in columns if c in names])
        pf = pq.ParquetFile(pa.BufferReader(_read_source(where, ResultsError, "results")))
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
    except (OSError, pa.ArrowException) as e:
        raise ResultsError(f"{where}: cannot read results Parquet: {e}") from None


def _floats(table: pa.Table, name: str) -> np.ndarray:
    # float16/32/bool -> float64; nulls -> NaN so they surface instead of vanishing
    return table.column(name).cast(pa.float64()).to_numpy()


@dataclass
class _Frame:
    """Columns of a results table as numpy arrays, validated once."""

    n: int
    status: np.ndarray  # object array of str
    ratio: np.ndarray
    area: np.ndarray
    peak: np.ndarray
    table: pa.Table

    @classmethod
    def of(cls, table: pa.Table) -> _Frame:
        missing = [c for c in _REQUIRED if c not in table.column_names]
        if missing:
            raise ResultsError(f"results lack column(s) {missing}")
        status = table.column("status").cast(pa.string())  # plain, large or dictionary strings
        bad = [s for s in pc.unique(status).to_pylist() if s not in STATUSES]
        if bad:
            raise ResultsError(f"results: status must be one of {STATUSES}, got {bad[0]!r}")
        return cls(table.num_rows, status.to_numpy(),
                   _floats(table, "invalid_activation_ratio"), _floats(table, "invalid_area_ratio"),
                   _floats(table, "peak_in_invalid"), table)

    def stats(self, sel: np.ndarray, share_ratio: float) -> dict:
        ok = sel & (self.status == "ok")
        n_rows, n_ok = int(sel.sum()), int(ok.sum())
        n_noact = int((sel & (self.status == "no_activation")).sum())
        n_err = int((sel & (self.status == "error")).sum())
        r, a, p = self.ratio[ok], self.area[ok], self.peak[ok]
        nan = float("nan")
        # Any NaN among ok rows makes the statistic NaN (np.mean propagates; the share is
        # forced), so a missing value fails the rule rather than counting as "not over".
        share = nan if not n_ok or np.isnan(r).any() else float(np.mean(r > share_ratio))
        return {
            "rows": n_rows,
            "ok": n_ok,
            "no_activation": n_noact,
            "error": n_err,
            "mean_invalid_activation_ratio": float(np.mean(r)) if n_ok else nan,
            "p95_invalid_activation_ratio": float(np.percentile(r, 95)) if n_ok else nan,
            "share_images_over": share,
            "share_over_ratio": share_ratio,
            "peak_in_invalid_rate": float(np.mean(p)) if n_ok else nan,
            "mean_invalid_area_ratio": float(np.mean(a)) if n_ok else nan,
            "mean_excess_over_area": float(np.mean(r - a)) if n_ok else nan,
            "error_rate": n_err / n_rows if n_rows else nan,
            "no_activation_rate": n_noact / n_rows if n_rows else nan,
        }

    def groups(self, by: str) -> list[tuple[str, np.ndarray]]:
        """(display value, row mask) per distinct value; by = 'predicted' | 'label' | column."""
        t = self.table
        col = {"predicted": "predicted_class"}.get(by, by)
        if col not in t.column_names:
            raise ResultsError(f"results lack column {col!r} needed to group by {by!r}")
        arr = t.column(col).combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        enc = pc.dictionary_encode(arr)
        codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        values = enc.dictionary.to_pylist()
        names = (t.column("predicted_label").to_pylist()
                 if by == "predicted" and "predicted_label" in t.column_names else None)
        out = []
        for i in _sorted_indices(values):
            mask = codes == i
            shown = str(values[i])
            if names is not None:  # a class id reads better as its name, when the model card has one
                shown = next((names[j] for j in np.flatnonzero(mask) if names[j] is not None), shown)
            out.append((shown, mask))
        if by != "predicted" and (codes == -1).any():
            # rows without a predicted class (errors) belong to no class; null metadata is a slice
            out.append(("<null>", codes == -1))
        return out


def _sorted_indices(values: list) -> list[int]:
    idx = list(range(len(values)))
    try:
        return sorted(idx, key=lambda i: values[i])
    except TypeError:
        return sorted(idx, key=lambda i: str(values[i]))


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
    n = {"ok": stats["ok"], "rows": stats["rows"], "road": stats.get("road_images", 0),
         "paired": stats.get("baseline_compared", 0)}[basis]
    value = float(stats.get(key, math.nan)) if rule.name != "min_images" else stats["ok"]
    res = dict(rule=rule.name, scope=scope, threshold=rule.threshold, op=op, n=n, params=rule.params)
    if rule.name != "min_images":
        if basis == "rows" and n == 0:
            return RuleResult(value=None, verdict="skip", reason="no rows in scope", **res)
        if basis == "road" and n == 0:
            return RuleResult(value=None, verdict="fail", reason=stats.get("road_reason") or "no ROAD scores", **res)
        if basis == "paired" and "baseline_compared" not in stats:  # a first model has no champion
            return RuleResult(value=None, verdict="skip", reason="no baseline (champion) results given", **res)
        if basis == "paired" and n == 0:
            return RuleResult(value=None, verdict="fail", reason="no image is ok in both the results and the baseline",
                              **res)
        if basis == "ok" and stats["ok"] < min_ok:
            why = "no ok images in scope" if stats["ok"] == 0 else f"{stats['ok']} ok images < {min_ok}"
            return RuleResult(value=None, verdict="skip", reason=why, **res)
        if math.isnan(value):
            return RuleResult(value=value, verdict="fail",
                              reason="value is NaN: missing per-image values among ok rows", **res)
    slack = _MEAN_ABS_TOL if key.startswith("mean_") else 0.0
    close = math.isclose(value, rule.threshold, rel_tol=_REL_TOL, abs_tol=slack)
    ok = close or (value <= rule.threshold if op == "<=" else value >= rule.threshold)
    return RuleResult(value=value, verdict="pass" if ok else "fail", **res)


def road_stats(road, layer: str | None = None) -> dict:
    """Faithfulness of the maps from a ROAD file (``camgate road``): the mean margin of ROAD over the
    seeded random map, over the images scored at ``layer`` (when the file holds several layers)."""
    if road is None:
        return {"road_images": 0, "road_reason": "the policy asks for faithfulness but no ROAD results were given "
                                                 "(camgate road ..., then gate --road)"}
    t = read_results(road, ("layer", "status", "road", "road_random"))
    missing = [c for c in ("road", "road_random") if c not in t.column_names]
    if missing:
        raise ResultsError(f"ROAD results lack column(s) {missing}")
    keep = np.ones(t.num_rows, dtype=bool)
    if "layer" in t.column_names and layer and len(set(t.column("layer").to_pylist())) > 1:
        keep &= np.array([v == layer for v in t.column("layer").to_pylist()])
    r, rnd = _floats(t, "road")[keep], _floats(t, "road_random")[keep]
    ok = np.isfinite(r) & np.isfinite(rnd)
    if not ok.any():
        return {"road_images": 0, "road_reason": "no image has a finite ROAD score (all-zero maps?)"}
    return {"road_images": int(ok.sum()), "road_mean": float(r[ok].mean()), "road_random_mean": float(rnd[ok].mean()),
            "faithfulness_margin": float((r[ok] - rnd[ok]).mean())}


_PAIR_COLUMNS = ("row", "image_id", "image", "status", "invalid_activation_ratio", "invalid_area_ratio",
                 "predicted_class", "predicted_label", "label")


def pair_baseline(results, baseline, name: str | None = None):
    """Rows of the results and of the baseline for the same images, paired by ``row`` and ``image``
    (a pandas DataFrame; the baseline's columns end in ``_baseline``). Refuses a baseline that shares
    no image with the results: comparing other images says nothing about a regression."""
    cand = read_results(results, _PAIR_COLUMNS).to_pandas()
    base = read_results(baseline, _PAIR_COLUMNS).to_pandas()
    for what, df in (("results", cand), ("baseline", base)):
        missing = [c for c in ("row", "image", "status", "invalid_activation_ratio") if c not in df.columns]
        if missing:
            raise ResultsError(f"{what} lack column(s) {missing} needed to pair with the "
                               f"{'baseline' if what == 'results' else 'results'}")
    keep = [c for c in ("row", "image", "status", "invalid_activation_ratio", "predicted_class") if c in base.columns]
    pairs = cand.merge(base[keep], on=["row", "image"], how="inner", suffixes=("", "_baseline"))
    if pairs.empty:
        where = name or (baseline if isinstance(baseline, (str, os.PathLike)) else "the baseline")
        raise BaselineError(f"{where}: no image in common with the results ({len(base)} baseline rows, "
                            f"{len(cand)} result rows, paired by row and image): a baseline must be the "
                            f"champion's results on the same data manifest")
    return pairs.sort_values("row", kind="stable").reset_index(drop=True)


def baseline_stats(results, baseline, worse_by: float = DEFAULT_WORSE_BY, name: str | None = None) -> dict:
    """Paired statistics against the baseline, over images that are ok in both runs."""
    pairs = pair_baseline(results, baseline, name)
    both = pairs[(pairs["status"] == "ok") & (pairs["status_baseline"] == "ok")]
    cand = both["invalid_activation_ratio"].to_numpy(float)
    base = both["invalid_activation_ratio_baseline"].to_numpy(float)
    n_rows = read_results(results, ("row",)).num_rows
    nan = float("nan")
    return {"baseline_paired": len(pairs), "baseline_unpaired": n_rows - len(pairs),
            "baseline_compared": len(both),
            "baseline_mean": float(base.mean()) if len(both) else nan,
            "baseline_candidate_mean": float(cand.mean()) if len(both) else nan,
            "baseline_mean_increase": float((cand - base).mean()) if len(both) else nan,
            "baseline_share_worse": float(np.mean(cand - base > worse_by)) if len(both) else nan,
            "baseline_worse_by": worse_by}


def _baseline_identity(results_md: dict, base_md: dict, baseline) -> tuple[dict, list[str]]:
    """Who the champion is, and warnings when its ratios were measured differently."""
    model = base_md.get("model") or {}
    ident = {"source": str(baseline) if isinstance(baseline, (str, os.PathLike)) else None,
             "model": model.get("name"), "weights_sha256": base_md.get("weights_sha256"),
             "method": base_md.get("method"), "target_layer": base_md.get("target_layer")}
    warnings = []
    for key in _COMPARABLE:
        if key in base_md and key in results_md and base_md[key] != results_md[key]:
            warnings.append(f"baseline computed with {key} {base_md[key]!r}, the results with {results_md[key]!r}: "
                            f"their invalid activation ratios may not be comparable")
    if base_md.get("weights_sha256") and base_md.get("weights_sha256") == results_md.get("weights_sha256"):
        warnings.append("baseline and results come from the same weights (equal sha256): is the baseline the "
                        "champion?")
    return ident, warnings


def evaluate(results: pa.Table | str | os.PathLike, policy: Policy | Mapping | str | os.PathLike,
             road=None, baseline=None) -> Decision:
    """Apply ``policy`` to a results table (or Parquet path/URI) and decide pass/fail.

    ``road``: ROAD results (table or URI) for the ``faithfulness`` rule; the decision is then marked
    ``trusted`` or not, with the reason. ``baseline``: the champion's results on the same data, for
    the baseline rules (the decision then names the champion and the paired statistics)."""
    policy = load_policy(policy)
    table = read_results(results, RESULT_COLUMNS + ("target_layer",) + policy.slices)
    missing = [s for s in policy.slices if s not in table.column_names]
    if missing:
        raise PolicyError(f"{policy.source}: slices: column {missing[0]!r} not in results")
    frame = _Frame.of(table)
    ratio = policy.share_ratio
    overall = frame.stats(np.ones(frame.n, dtype=bool), ratio)
    faith = policy.rule("faithfulness")
    if faith or road is not None:
        layers = table.column("target_layer").drop_null().unique().to_pylist() if "target_layer" in table.column_names else []
        overall.update(road_stats(road, layers[0] if len(layers) == 1 else None))
    ident, warnings = None, []
    if baseline is not None:
        from .results import run_metadata

        worse = policy.rule("baseline_share_worse")
        base_table = read_results(baseline, _PAIR_COLUMNS)  # read once: pairs and metadata
        name = str(baseline) if isinstance(baseline, (str, os.PathLike)) else None
        overall.update(baseline_stats(table, base_table, worse.params["by"] if worse else DEFAULT_WORSE_BY, name))
        ident, warnings = _baseline_identity(run_metadata(table), run_metadata(base_table), baseline)
        ident.update({k: v for k, v in overall.items() if k.startswith("baseline_")})
        if overall["baseline_unpaired"]:
            warnings.append(f"{overall['baseline_unpaired']} of {frame.n} result rows have no baseline row for the same "
                            f"image: the comparison covers the other {overall['baseline_paired']}")
    rules = [_judge(r, overall, "all", 1) for r in policy.rules]
    trusted = reason = None
    if faith:
        verdict = next(r for r in rules if r.rule == "faithfulness")
        trusted = verdict.verdict == "pass"
        reason = (f"ROAD beats the random map by {verdict.value:.3f} (margin >= {faith.threshold:g})" if trusted else
                  verdict.reason or f"ROAD beats the random map by only {verdict.value:.3f} (< {faith.threshold:g}): "
                                    f"a verdict on heatmaps that do not show what the model uses is not evidence")

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

    counts = {k: overall[k] for k in ("rows", *STATUSES)}
    metrics = {k: v for k, v in overall.items() if k not in counts and k != "road_reason"}
    return Decision(policy.name, all(r.verdict != "fail" for r in rules), counts, metrics, rules, scopes,
                    trusted, reason, ident, warnings)


def gate(results_uri: str | os.PathLike | pa.Table, policy_uri: Policy | Mapping | str | os.PathLike,
         road=None, baseline=None) -> Decision:
    """Load the policy (first: a bad policy fails fast, before reading results) and evaluate."""
    return evaluate(results_uri, load_policy(policy_uri), road, baseline)


def class_stats(results: pa.Table | str | os.PathLike, by: str = "predicted",
                share_ratio: float = DEFAULT_SHARE_RATIO) -> list[dict]:
    """Per-class statistics (as in a decision's scopes), whatever the policy's per_class says."""
    frame = _Frame.of(read_results(results))
    if by == "predicted" and "predicted_class" not in frame.table.column_names:
        return []
    return [{"class": shown, **frame.stats(mask, share_ratio)} for shown, mask in frame.groups(by)]
