"""Statistics the gate judges: per-scope numbers of a results table (whole run, per class, per
slice), ROAD faithfulness, and the pairing with a champion's results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import IdentityError
from ..io.results import (REQUIRED_COLUMNS, SANITY_SIMILARITIES, STATUSES, TASK_STATUSES, ResultsError, file_identity,
                          identity_differences, read_results, run_metadata)
from .policy import DEFAULT_SHARE_RATIO, DEFAULT_WORSE_BY

# Settings that make two runs' ratios comparable; a baseline that differs in one gets a warning.
_COMPARABLE = ("method", "target", "target_layer", "static_mask", "mask_spec", "topk", "budget", "seed", "task")
# What a ROAD file must share with the results to vouch for their maps (besides the layer and images).
_ROAD_BINDS = ("model_card_sha256", "weights_sha256", "method", "target")
_SHOWN = 5  # rows named in one message
# per-image metrics undefined on an empty or full mask (judged over the images where they are defined)
JUDGED_COLUMNS = ("relevance_rank_accuracy", "auc")
REL_TOL = 1e-9
MEAN_ABS_TOL = 1e-6  # well below any meaningful threshold, above float32 storage error


class BaselineError(ResultsError):
    """The baseline results cannot be compared with the results (no image in common)."""


def _floats(table: pa.Table, name: str) -> np.ndarray:
    # float16/32/bool -> float64; nulls -> NaN so they surface instead of vanishing
    return table.column(name).cast(pa.float64()).to_numpy()


@dataclass
class Frame:
    """Columns of a results table as numpy arrays, validated once."""

    n: int
    status: np.ndarray  # object array of str
    ratio: np.ndarray
    area: np.ndarray
    peak: np.ndarray
    table: pa.Table
    task_statuses: tuple[str, ...] = ()  # the statuses only this file's task holds, counted per scope
    judged: dict[str, np.ndarray] | None = None  # JUDGED_COLUMNS the results have

    @classmethod
    def of(cls, table: pa.Table) -> Frame:
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ResultsError(f"results lack column(s) {missing}")
        status = table.column("status").cast(pa.string())  # plain, large or dictionary strings
        bad = [s for s in pc.unique(status).to_pylist() if s not in STATUSES]
        if bad:
            raise ResultsError(f"results: status must be one of {STATUSES}, got {bad[0]!r}")
        status = status.to_numpy()
        return cls(table.num_rows, status,
                   _floats(table, "invalid_activation_ratio"), _floats(table, "invalid_area_ratio"),
                   _floats(table, "peak_in_invalid"), table, _task_statuses(table, status),
                   {c: _floats(table, c) for c in JUDGED_COLUMNS if c in table.column_names})

    def stats(self, sel: np.ndarray, share_ratio: float) -> dict:
        ok = sel & (self.status == "ok")
        n_rows, n_ok = int(sel.sum()), int(ok.sum())
        n_noact = int((sel & (self.status == "no_activation")).sum())
        n_err = int((sel & (self.status == "error")).sum())
        # per-object tasks: images with nothing to explain, ground-truth boxes no detection matched,
        # named classes without a region (counted for the files of that task only)
        detection = {s: int((sel & (self.status == s)).sum()) for s in self.task_statuses}
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
            **detection,
            "mean_invalid_activation_ratio": float(np.mean(r)) if n_ok else nan,
            "p95_invalid_activation_ratio": float(np.percentile(r, 95)) if n_ok else nan,
            "share_images_over": share,
            "share_over_ratio": share_ratio,
            "peak_in_invalid_rate": float(np.mean(p)) if n_ok else nan,
            "mean_invalid_area_ratio": float(np.mean(a)) if n_ok else nan,
            "mean_excess_over_area": float(np.mean(r - a)) if n_ok else nan,
            "error_rate": n_err / n_rows if n_rows else nan,
            "no_activation_rate": n_noact / n_rows if n_rows else nan,
            **self._judged(ok),
        }

    def _judged(self, ok: np.ndarray) -> dict:
        """Means of the localisation metrics defined only for a mask with valid and invalid pixels, over
        the ok images whose mask has both (a NaN there is missing and makes the mean NaN); absent from
        results written without them."""
        out = {}
        domain = ok & (self.area > 0) & (self.area < 1)
        for col, values in (self.judged or {}).items():
            v = values[domain]
            out[f"mean_{col}"] = float(np.mean(v)) if len(v) else float("nan")
            out[f"{col}_images"] = int(domain.sum())
        return out

    def groups(self, by: str) -> list[tuple[str, np.ndarray]]:
        """(display value, row mask) per distinct value; by = 'predicted' | 'label' | column."""
        t = self.table
        # a detector's rows: predicted_class is the detection's class (det_class)
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


def _task_statuses(table: pa.Table, status: np.ndarray) -> tuple[str, ...]:
    """The statuses only the results' task writes (detection, segmentation, multi-label)."""
    if "det_index" in table.column_names:
        return TASK_STATUSES["detection"]
    task = file_identity(run_metadata(table)).get("task")
    if task in TASK_STATUSES:
        return TASK_STATUSES[task]
    return tuple(s for s in ("no_region", "no_label") if (status == s).any())  # metadata dropped


def _sorted_indices(values: list) -> list[int]:
    idx = list(range(len(values)))
    try:
        return sorted(idx, key=lambda i: values[i])
    except TypeError:
        return sorted(idx, key=lambda i: str(values[i]))


ROAD_COLUMNS = ("row", "image", "image_sha256", "layer", "status", "road", "road_random", *SANITY_SIMILARITIES)


def _answers_to(table):
    """``(frame, name) -> bool`` for a layers or ROAD file: a frame answers to its own label and to every
    module name whose output it is (results name `layer3`, the all-layers plan that frame `layer3.1.relu#1`)."""
    aliases = run_metadata(table).get("layer_aliases") or {}
    return lambda frame, name: frame == name or name in aliases.get(frame, ())


def road_binding(results: pa.Table, road: pa.Table, name: str | None = None) -> None:
    """Refuse (:class:`IdentityError`, naming the field and both values) a ROAD file that did not score
    these results' maps: another model (card or weights), method, target or layer, or images the
    results do not have (by ``row`` and ``image``, and by content where both files hash it). A ROAD
    file without rows scores nothing and is let through (it cannot make a verdict trusted)."""
    if road.num_rows == 0:
        return
    where = name or "the ROAD results"
    mine, theirs = file_identity(run_metadata(results)), file_identity(run_metadata(road))

    def refuse(field: str, road_value, results_value) -> None:
        raise IdentityError(f"{where} scored other maps than the results: {field} is {road_value!r} in the ROAD "
                            f"file but {results_value!r} in the results; ROAD scores make only the run they scored "
                            f"trusted (camgate road with the run's model, method, target and layer, on its data)")

    for f in _ROAD_BINDS:  # what the results state, the ROAD file must state alike
        if mine.get(f) is not None and theirs.get(f) != mine[f]:
            refuse(f, theirs.get(f), mine[f])
    for f, a, b in identity_differences(theirs, mine, ("task",)):
        refuse(f, a, b)
    layers = mine.get("target_layer")
    if layers:
        layer = ",".join(layers) if isinstance(layers, list) else str(layers)
        scored = theirs.get("target_layer")
        if scored is None and "layer" in road.column_names:
            scored = sorted(set(road.column("layer").drop_null().to_pylist()))
        answers = _answers_to(road)
        if scored is not None and not any(answers(f, layer) for f in scored):
            refuse("target_layer", scored, layer)
    if not {"row", "image"} <= set(road.column_names) & set(results.column_names):
        return
    have = dict(zip(results.column("row").to_pylist(), results.column("image").to_pylist()))
    for r, image in sorted(set(zip(road.column("row").to_pylist(), road.column("image").to_pylist()))):
        if have.get(r) != image:
            refuse(f"row {r}'s image", image, have.get(r))
    if "image_sha256" in road.column_names and "image_sha256" in results.column_names:
        content = dict(zip(results.column("row").to_pylist(), results.column("image_sha256").to_pylist()))
        for r, sha in zip(road.column("row").to_pylist(), road.column("image_sha256").to_pylist()):
            if sha and content.get(r) and sha != content[r]:
                refuse(f"row {r}'s image_sha256", sha, content[r])


def road_stats(road, layer: str | None = None) -> dict:
    """Faithfulness of the maps from a ROAD file (``camgate road``): the mean margin of ROAD over the
    seeded random map, over the images scored at ``layer`` (when the file holds several layers)."""
    if road is None:
        return {"road_images": 0, "road_reason": "the policy asks for faithfulness but no ROAD results were given "
                                                 "(camgate road ..., then gate --road)"}
    t = read_results(road, ROAD_COLUMNS)
    missing = [c for c in ("road", "road_random") if c not in t.column_names]
    if missing:
        raise ResultsError(f"ROAD results lack column(s) {missing}")
    keep = np.ones(t.num_rows, dtype=bool)
    if "layer" in t.column_names and layer and len(set(t.column("layer").to_pylist())) > 1:
        answers = _answers_to(t)
        keep &= np.array([answers(v, layer) for v in t.column("layer").to_pylist()])
    out = _sanity_stats(t, keep)
    r, rnd = _floats(t, "road")[keep], _floats(t, "road_random")[keep]
    ok = np.isfinite(r) & np.isfinite(rnd)
    if not ok.any():
        return {**out, "road_images": 0, "road_reason": "no image has a finite ROAD score (all-zero maps?)"}
    return {**out, "road_images": int(ok.sum()), "road_mean": float(r[ok].mean()),
            "road_random_mean": float(rnd[ok].mean()), "faithfulness_margin": float((r[ok] - rnd[ok]).mean())}


def _sanity_stats(t: pa.Table, keep: np.ndarray) -> dict:
    """Mean similarities of the sanity checks over the images the file scored (status ok)."""
    if not set(SANITY_SIMILARITIES) <= set(t.column_names):
        return {"sanity_images": 0, "sanity_reason": "the ROAD file holds no sanity checks (camgate road --sanity, "
                                                     "or the pipeline's sanity input)"}
    ok = keep & (t.column("status").cast(pa.string()).to_numpy(zero_copy_only=False) == "ok")
    if not ok.any():
        return {"sanity_images": 0, "sanity_reason": "no image of the ROAD file was scored (all-zero maps?)"}
    # a NaN among scored images (a map too small for SSIM) makes its mean NaN: judged as missing
    return {"sanity_images": int(ok.sum()),
            **{f"mean_{c}": float(_floats(t, c)[ok].mean()) for c in SANITY_SIMILARITIES}}


PAIR_COLUMNS = ("row", "image_id", "image", "status", "invalid_activation_ratio", "invalid_area_ratio",
                 "predicted_class", "predicted_label", "label", "image_sha256", "mask_sha256")


def pair_baseline(results, baseline, name: str | None = None):
    """Rows of the results and of the baseline for the same images, paired by ``row`` and ``image``
    (a pandas DataFrame; the baseline's columns end in ``_baseline``). Refuses (:class:`BaselineError`)
    a baseline that is not analyzed results (a heatmaps file has no ratios to compare), that holds a
    ``row`` more than once, whose image of a paired row has other content (where both files hash it),
    or that shares no image with the results: comparing other images says nothing about a regression."""
    where = name or (baseline if isinstance(baseline, (str, os.PathLike)) else "the baseline")
    cand_t, base_t = read_results(results, PAIR_COLUMNS), read_results(baseline, PAIR_COLUMNS)
    stage = run_metadata(base_t).get("stage")
    if stage is not None and stage != "results":
        what = "a heatmaps file: it holds maps but no invalid activation ratios (camgate analyze it first)" \
            if stage == "heatmaps" else "not a results file"
        raise BaselineError(f"{where}: stage is {stage!r}, not 'results': {what}; a baseline must be the champion's "
                            f"analyzed results")
    for what, t in (("the results", cand_t), (where, base_t)):
        task = file_identity(run_metadata(t)).get("task")
        if task in ("detection", "segmentation", "multilabel"):
            rows = "detection" if task == "detection" else "explained class"
            raise BaselineError(f"{what}: a {task} model's results (one row per {rows}) cannot be paired image by "
                                f"image with a baseline; the baseline rules apply to single-label classifiers")
    cand, base = cand_t.to_pandas(), base_t.to_pandas()
    for what, df in (("results", cand), ("baseline", base)):
        missing = [c for c in ("row", "image", "status", "invalid_activation_ratio") if c not in df.columns]
        if missing:
            raise ResultsError(f"{what} lack column(s) {missing} needed to pair with the "
                               f"{'baseline' if what == 'results' else 'results'}")
        dup = sorted(set(df.loc[df["row"].duplicated(), "row"].tolist()))
        if dup:
            shown = ", ".join(str(r) for r in dup[:_SHOWN]) + (f" and {len(dup) - _SHOWN} more" if len(dup) > _SHOWN
                                                               else "")
            raise BaselineError(f"{where if what == 'baseline' else 'the results'}: row(s) {shown} appear more than "
                                f"once ({len(df) - df['row'].nunique()} duplicate rows): one row per image is needed "
                                f"to pair the {what} with the {'results' if what == 'baseline' else 'baseline'}")
    keep = [c for c in ("row", "image", "status", "invalid_activation_ratio", "predicted_class", "image_sha256",
                        "mask_sha256") if c in base.columns]
    pairs = cand.merge(base[keep], on=["row", "image"], how="inner", suffixes=("", "_baseline"))
    if pairs.empty:
        raise BaselineError(f"{where}: no image in common with the results ({len(base)} baseline rows, "
                            f"{len(cand)} result rows, paired by row and image): a baseline must be the "
                            f"champion's results on the same data manifest")
    if {"image_sha256", "image_sha256_baseline"} <= set(pairs.columns):
        a, b = pairs["image_sha256"], pairs["image_sha256_baseline"]
        other = pairs[a.notna() & b.notna() & (a != b)]
        if len(other):
            r = other.iloc[0]
            raise BaselineError(f"{where}: row {r['row']} ({r['image']}) has image_sha256 {r['image_sha256_baseline']} "
                                f"in the baseline but {r['image_sha256']} in the results ({len(other)} paired images "
                                f"differ in content): the champion was computed on other images")
    return pairs.sort_values("row", kind="stable").reset_index(drop=True)


def baseline_stats(results, baseline, worse_by: float = DEFAULT_WORSE_BY, name: str | None = None) -> dict:
    """Paired statistics against the baseline, over images that are ok in both runs."""
    pairs = pair_baseline(results, baseline, name)
    both = pairs[(pairs["status"] == "ok") & (pairs["status_baseline"] == "ok")]
    cand = both["invalid_activation_ratio"].to_numpy(float)
    base = both["invalid_activation_ratio_baseline"].to_numpy(float)
    delta = cand - base
    n_rows = read_results(results, ("row",)).num_rows
    nan = float("nan")
    other_masks = 0
    if {"mask_sha256", "mask_sha256_baseline"} <= set(pairs.columns):
        a, b = pairs["mask_sha256"], pairs["mask_sha256_baseline"]
        other_masks = int((a.notna() & b.notna() & (a != b)).sum())
    # a NaN delta (a ratio missing on a row ok in both) is not "not worse": as for the other
    # statistics, it makes the share NaN and the rule fails saying so
    return {"baseline_paired": len(pairs), "baseline_unpaired": n_rows - len(pairs),
            "baseline_compared": len(both),
            "baseline_mean": float(base.mean()) if len(both) else nan,
            "baseline_candidate_mean": float(cand.mean()) if len(both) else nan,
            "baseline_mean_increase": float(delta.mean()) if len(both) else nan,
            "baseline_share_worse": float(np.mean(delta > worse_by)) if len(both) and not np.isnan(delta).any()
            else nan,
            "baseline_worse_by": worse_by, "baseline_other_masks": other_masks}


def baseline_identity(results_md: dict, base_md: dict, baseline) -> tuple[dict, list[str]]:
    """Who the champion is, and warnings when its ratios were measured differently."""
    model = base_md.get("model") or {}
    ident = {"source": str(baseline) if isinstance(baseline, (str, os.PathLike)) else None,
             "model": model.get("name"), "weights_sha256": base_md.get("weights_sha256"),
             "method": base_md.get("method"), "target_layer": base_md.get("target_layer")}
    warnings = []
    for key, theirs, mine in identity_differences(file_identity(base_md), file_identity(results_md), _COMPARABLE):
        warnings.append(f"baseline computed with {key} {theirs!r}, the results with {mine!r}: "
                        f"their invalid activation ratios may not be comparable")
    if base_md.get("weights_sha256") and base_md.get("weights_sha256") == results_md.get("weights_sha256"):
        warnings.append("baseline and results come from the same weights (equal sha256): is the baseline the "
                        "champion?")
    return ident, warnings


def class_stats(results: pa.Table | str | os.PathLike, by: str = "predicted",
                share_ratio: float = DEFAULT_SHARE_RATIO) -> list[dict]:
    """Per-class statistics (as in a decision's scopes), whatever the policy's per_class says."""
    frame = Frame.of(read_results(results))
    if by == "predicted" and "predicted_class" not in frame.table.column_names:
        return []
    return [{"class": shown, **frame.stats(mask, share_ratio)} for shown, mask in frame.groups(by)]
