"""The policy: its schema, defaults and parser (what the gate checks).

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
      mean_relevance_rank_accuracy: {max: 0.30}     # mean share of the top-|M| pixels that are invalid
      mean_auc: {max: 0.60}                         # mean ROC-AUC of the map as a score for invalid pixels
      faithfulness: {min_margin: 0.05}              # ROAD - random-map ROAD (gate --road)
      sanity: {max_randomised_similarity: 0.5,      # the maps must change when the model is randomised
               max_random_logit_similarity: 0.7}    # ... and between classes (gate --road, road --sanity)
      baseline_mean_increase: {max: 0.02}           # mean ratio - the champion's (gate --baseline)
      baseline_share_worse: {by: 0.05, max: 0.10}   # share of images whose ratio rose by > 0.05
    per_class: predicted      # false (default) | true = predicted | predicted | label
    slices: [camera]          # metadata columns: rules also apply per value
    min_scope_images: 5       # class/slice scopes with fewer ok images are skipped (default 1)

Defaults: a rule left out is not checked, except ``error_rate`` (default ``max: 0.0``: every
image must be judged), ``no_activation_rate`` (default ``max: 0.05``: at most 5 % all-zero maps) and
``min_images`` (default ``1``: an empty run never passes). Set any of them to ``null`` to turn it
off. ``{max: x}`` may be written as a bare number. ``min_images`` applies to the
whole run only; in class/slice scopes ``min_scope_images`` decides whether a scope is judged at all,
so a rarely predicted class is skipped (with a reason) rather than failing the gate on no evidence.

Comparisons are inclusive (``value <= max`` passes). Means of per-image numbers get 1e-6 absolute
slack (the results may hold float32: 0.3 is stored as 0.30000001); rates of counts get only 1e-9
relative slack, so ``error_rate: {max: 0.0}`` stays strict however many rows there are. A NaN
value with images behind it fails: a missing per-image number must never pass silently. Rules over
rows (error/no-activation rates) are not applied to predicted-class scopes, which hold no error
rows by construction.

``mean_relevance_rank_accuracy`` and ``mean_auc`` are judged over the ok images whose mask has both
valid and invalid pixels (``0 < invalid_area_ratio < 1``): elsewhere the metrics are undefined (NaN)
by definition; with no such image the rule is skipped with that reason.

``faithfulness`` and ``sanity`` judge the faithfulness file (``camgate road [--sanity]``, ``gate
--road``) and together decide whether the decision is ``trusted``. ``sanity`` bounds the mean, over
the scored images, of each map's similarity (``measure: spearman`` (default) or ``ssim``) to the map
of the fully randomised model and to the map of another class; either bound may be left out.

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

import yaml

from ..errors import ConfigError
from ..io.storage import read_source

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
    # 'judged': over the ok images whose mask has valid and invalid pixels (the metric's domain)
    "mean_relevance_rank_accuracy": ("<=", "mean_relevance_rank_accuracy", "judged", (0.0, 1.0)),
    "mean_auc": ("<=", "mean_auc", "judged", (0.0, 1.0)),
    # over the images of a ROAD file (`camgate road`): mean(road - road_random), run-wide only
    "faithfulness": (">=", "faithfulness_margin", "road", (-1.0, 1.0)),
    # written `sanity: {max_randomised_similarity: s, max_random_logit_similarity: t, measure: m}`: over the
    # images of a ROAD file with the sanity checks, the mean similarity (measure) of their maps to the
    # fully randomised model's and to another class's, run-wide only
    "randomised_similarity": ("<=", "mean_randomised_{measure}", "sanity", (-1.0, 1.0)),
    "random_logit_similarity": ("<=", "mean_random_logit_{measure}", "sanity", (-1.0, 1.0)),
    # against a baseline (champion) results file of the same images (gate --baseline), run-wide only,
    # over the images that are ok in both runs, paired by row and image
    "baseline_mean_increase": ("<=", "baseline_mean_increase", "paired", (-1.0, 1.0)),
    "baseline_share_worse": ("<=", "baseline_share_worse", "paired", (0.0, 1.0)),
}
RUN_WIDE = ("min_images", "faithfulness", "randomised_similarity", "random_logit_similarity",
            "baseline_mean_increase", "baseline_share_worse")
# the rules that decide whether the heatmaps are trusted (a verdict on them is evidence)
TRUST_RULES = ("faithfulness", "randomised_similarity", "random_logit_similarity")
# `sanity: {...}` in a policy: its bounds -> the rules they set; `measure` picks the similarity
SANITY_BOUNDS = {"max_randomised_similarity": "randomised_similarity",
                 "max_random_logit_similarity": "random_logit_similarity"}
MEASURES = ("spearman", "ssim")
DEFAULT_SHARE_RATIO = 0.5
DEFAULT_WORSE_BY = 0.05  # baseline_share_worse: a ratio rise above this counts as "worse"
# Checked unless the policy sets them to null: every image must be judged; an all-zero map is
# no evidence either way, and a few are normal for Grad-CAM (its channel weights can all be
# negative for a class), but a run of them must not pass on what the other maps say; and an empty
# run never passes.
DEFAULT_RULES = {"error_rate": {"max": 0.0}, "no_activation_rate": {"max": 0.05}, "min_images": 1}
_PARAMS = {"share_images_over": {"ratio": DEFAULT_SHARE_RATIO}, "baseline_share_worse": {"by": DEFAULT_WORSE_BY}}
_POLICY_KEYS = {"name", "description", "rules", "per_class", "slices", "min_scope_images"}


class PolicyError(ConfigError):
    """The policy is unreadable or invalid; the message names the file and the key."""


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
            if r.name in SANITY_BOUNDS.values():
                bound = next(b for b, n in SANITY_BOUNDS.items() if n == r.name)
                rules.setdefault("sanity", {}).update({bound: r.threshold, **r.params})
                continue
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
    data = read_source(where, PolicyError, "policy")
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
    named = [r for r in RULES if r not in SANITY_BOUNDS.values()] + ["sanity"]
    unknown = sorted(set(map(str, raw_rules)) - set(named))
    if unknown:
        fail(f"rules.{unknown[0]}", f"unknown rule (expected one of {named})")
    specs = {**DEFAULT_RULES, **{k: v for k, v in raw_rules.items() if k != "sanity"}}
    specs.update(_sanity_specs(raw_rules.get("sanity"), fail))

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
        if rname in SANITY_BOUNDS.values():  # checked by _sanity_specs, under the names the policy uses
            rules.append(Rule(rname, float(spec["max"]), op, {"measure": spec["measure"]}))
            continue
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


def _sanity_specs(spec: Any, fail) -> dict:
    """`sanity: {max_randomised_similarity: s, max_random_logit_similarity: t, measure: m}` -> the specs of
    the rules it sets."""
    if spec is None:
        return {}
    bounds = f"{' and/or '.join(SANITY_BOUNDS)} (and measure: {' | '.join(MEASURES)})"
    if not isinstance(spec, Mapping):
        fail("rules.sanity", f"must be a mapping of {bounds}, got {spec!r}")
    _only_keys(spec, {*SANITY_BOUNDS, "measure"}, "rules.sanity", fail)
    measure = spec.get("measure", MEASURES[0])
    if measure not in MEASURES:
        fail("rules.sanity.measure", f"must be one of {list(MEASURES)}, got {measure!r}")
    out = {rname: {"max": _number(spec[b], -1.0, 1.0, f"rules.sanity.{b}", fail), "measure": measure}
           for b, rname in SANITY_BOUNDS.items() if spec.get(b) is not None}
    if not out:
        fail("rules.sanity", f"names no bound: give {bounds}")
    return out


def _only_keys(spec: Mapping, allowed: set, key: str, fail) -> None:
    extra = sorted(set(map(str, spec)) - allowed)
    if extra:
        fail(f"{key}.{extra[0]}", f"unknown key (expected one of {sorted(allowed)})")


def _number(v: Any, lo: float, hi: float, key: str, fail) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        fail(key, f"must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


# --------------------------------------------------------------------------- results


