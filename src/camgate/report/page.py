"""The report's page model: a decision and its results as one list of sections (verdict, rules,
scopes, distribution, champion, worst images, errors) that :mod:`.render` writes as Markdown or HTML."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..gating.decision import Decision, RuleResult
from ..gating.stats import class_stats
from ..io.results import RESULT_COLUMNS, read_results, run_metadata
from . import detection
from .overlays import worst_rows

MAX_ROWS = {"html": 300, "md": 50}  # rows per table
WORSE = 10  # images listed as worse than with the champion
_OPS = {"<=": "≤", ">=": "≥"}
_NOT = {"<=": ">", ">=": "<"}
_MAX_ERROR_CHARS = 300
_QUANTILES = (("min", 0), ("p5", 5), ("p25", 25), ("median", 50), ("p75", 75), ("p95", 95), ("max", 100))


# --------------------------------------------------------------------------- content


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    marks: list[str] | None = None  # CSS class per row (HTML): v-pass | v-fail | v-skip
    more: str = ""  # "... and N more" under a capped table


@dataclass
class Figure:  # HTML only
    image: bytes
    alt: str
    caption: str = ""


@dataclass
class Gallery:  # HTML only: (picture or None, caption lines) per image
    items: list[tuple[bytes | None, list[str]]]
    boxes: bool = False  # a detection run's: each picture has its detection's box drawn


@dataclass
class Sub:  # a sub-heading
    text: str


@dataclass
class Page:
    title: str
    verdict: str
    trust: str | None = None  # the ROAD trust line, when the policy asks for faithfulness
    trusted: bool | None = None
    notes: list[str] = field(default_factory=list)  # warnings, shown under the verdict
    sections: list[tuple[str, list]] = field(default_factory=list)  # (heading, parts)
    footer: list[str] = field(default_factory=list)  # record hash, approval


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _text(v) -> str:
    if v is None or v == "" or v == []:
        return "n/a"
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _rule_name(r: RuleResult) -> str:
    if r.rule == "share_images_over" and "ratio" in r.params:
        return f"share_images_over (ratio > {r.params['ratio']:g})"
    if "measure" in r.params:  # the sanity rule's two bounds
        return f"sanity: {r.rule} ({r.params['measure']})"
    return r.rule


def _faithfulness(o: dict, rec: dict | None) -> list:
    """ROAD and the sanity checks, as the faithfulness file gave them."""
    rows = []
    if o.get("road_images"):
        rows += [["images scored by ROAD", str(o["road_images"])], ["mean ROAD of the maps", _fmt(o.get("road_mean"))],
                 ["mean ROAD of a random map", _fmt(o.get("road_random_mean"))],
                 ["margin (faithfulness)", _fmt(o.get("faithfulness_margin"))]]
    if o.get("sanity_images"):
        rows += [["images sanity-checked", str(o["sanity_images"])]]
        rows += [[f"mean {m} similarity to the {what}", _fmt(o.get(f"mean_{c}_{m}"))]
                 for c, what in (("randomised", "fully randomised model's map"),
                                 ("random_logit", "map of another class")) for m in ("spearman", "ssim")]
    checked = ((rec or {}).get("sanity") or {}).get("checked") or {}
    notes = [f"{k.replace('_', ' ')}: {v}" for k, v in checked.items() if isinstance(v, str)]
    return ([Table(["statistic", "value"], rows)] + notes) if rows else []


def _failure(r: RuleResult) -> str:
    return (f"{_rule_name(r)} {_fmt(r.value)} {_NOT[r.op]} {_fmt(r.threshold)}"
            + (f" ({r.reason})" if r.reason else ""))


def _verdict_line(d: Decision, limit: int) -> str:
    verdicts = [r.verdict for r in d.rules]
    head = (f"{'PASS' if d.passed else 'FAIL'}: policy '{d.policy}', {len(verdicts)} rules "
            f"({verdicts.count('pass')} pass, {verdicts.count('fail')} fail, {verdicts.count('skip')} skip)")
    failed = [f"{r.rule} @ {r.scope}: {_fmt(r.value)} not {_OPS[r.op]} {_fmt(r.threshold)}"
              + (f" ({r.reason})" if r.reason else "") for r in d.failed[:limit]]
    more = len(d.failed) - len(failed)
    if more > 0:
        failed.append(f"... and {more} more")
    return head + ("; failed: " + "; ".join(failed) if failed else "")


def _cap(rows: list, first: list[bool], limit: int) -> tuple[list[int], int]:
    """Indices of at most ``limit`` rows, those flagged ``first`` (failures) before the others, in
    table order; and how many were left out."""
    keep = [i for i, f in enumerate(first) if f][:limit]
    keep += [i for i, f in enumerate(first) if not f][:limit - len(keep)]
    return sorted(keep), len(rows) - len(keep)


def _capped(head, rows, marks, first, limit, what: str) -> Table:
    keep, more = _cap(rows, first, limit)
    return Table(head, [rows[i] for i in keep], [marks[i] for i in keep] if marks else None,
                  f"... and {more} more {what}" if more else "")


def _given(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))  # pandas gives NaN for null


def _class_of(row: dict) -> str:
    for key in ("predicted_label", "predicted_class", "label"):
        v = row.get(key)
        if _given(v):
            return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    return ""


def _label_of(row: dict, classes) -> str | None:
    """The manifest's label, with its class name when the label is a class index of the card."""
    label = row.get("label")
    if not _given(label) or str(label) == "":
        return None
    label = str(label)
    if classes and label.isdigit() and int(label) < len(classes) and classes[int(label)] != label:
        return f"{classes[int(label)]} ({label})"
    return label


def _identity(rec: dict) -> Table:
    """Which model, data, method and policy the verdict is about, with the hashes an auditor checks."""
    m, data, meth, pol = rec["model"], rec["data"], rec["method"], rec["policy"]
    env = rec.get("environment") or {}
    res = (rec.get("files") or {}).get("results") or {}
    size = meth.get("map_resolution")
    rows = [
        *([["task", _text(rec["task"])]] if rec.get("task") else []),
        ["model", f"{_text(m.get('name'))} ({m.get('kind') or 'torch'}: {_text(m.get('arch'))})"],
        ["model card sha256", _text(m.get("card_sha256"))],
        ["weights sha256", _text(m.get("weights_sha256"))],
        ["method", f"{_text(meth.get('name'))}, explaining "
                   + ("each detection's box score" if rec.get("task") == "detection"
                      else f"the {_text(meth.get('target'))} class")],
        ["target layer", _text(meth.get("target_layer"))],
        ["map resolution", f"{size[0]} × {size[1]}" if size else "n/a"],
        ["data manifest", _text(data.get("manifest"))],
        ["data manifest sha256", _text(data.get("manifest_sha256"))],
        ["data fingerprint", f"{_text(data.get('fingerprint'))} ({_text(data.get('fingerprint_images'))} images)"
         if data.get("fingerprint") else "n/a"],
        ["policy", f"{_text(pol.get('name'))} ({_text(pol.get('uri'))})"],
        ["policy sha256", _text(pol.get("sha256"))],
        ["results", f"{_text(res.get('uri'))} (sha256 {_text(res.get('sha256'))})"],
        ["software", f"camgate {rec.get('camgate_version')}, torch {_text(env.get('torch'))} on "
                     f"{_text(env.get('device'))}"],
        ["heatmaps computed", _text((rec.get("times") or {}).get("heatmaps_started_at"))],
    ]
    return Table(["what", "value"], rows)


def _distribution(table: pa.Table, share_ratio: float, figures: bool) -> list:
    ok = table.column("status").cast(pa.string()).to_numpy(zero_copy_only=False) == "ok"
    ratio = table.column("invalid_activation_ratio").cast(pa.float64()).to_numpy()[ok]
    area = table.column("invalid_area_ratio").cast(pa.float64()).to_numpy()[ok]
    keep = np.isfinite(ratio) & np.isfinite(area)
    ratio, area = ratio[keep], area[keep]
    if not len(ratio):
        return ["(no ok images)"]
    rows = [[name, *(_fmt(q) for q in np.percentile(v, [p for _, p in _QUANTILES]))]
            for name, v in (("invalid activation ratio", ratio), ("invalid area share", area),
                            ("excess (ratio − area)", ratio - area))]
    parts: list = [Table(["over ok images", *(n for n, _ in _QUANTILES)], rows)]
    if figures:
        from .plots import ratio_area_png

        parts.insert(0, Figure(ratio_area_png(ratio, area, share_ratio),
                                "histogram of invalid activation ratios over the invalid area share",
                                f"{len(ratio)} ok images. Above the line y = x the heat lies on invalid pixels more "
                                f"than their share of the image."))
    return parts


def _scopes(d: Decision, table: pa.Table | None, limit: int) -> list[tuple[str, list]]:
    """One table per grouping (class, then each slice column), failing scopes marked with their
    failed rules."""
    ratio = d.overall.get("share_over_ratio", 0.5)
    by_scope: dict[str, list[RuleResult]] = defaultdict(list)
    for r in d.rules:
        by_scope[r.scope].append(r)
    groups: dict[str, list[tuple[str, dict]]] = {}
    for s in d.scopes:
        key, _, value = s["scope"].partition("=")
        groups.setdefault(key, []).append((value, s))
    unjudged = "class" not in groups and table is not None
    if unjudged:  # the policy has no per_class, but a reviewer still asks how each class fares
        groups = {"class": [(s["class"], s) for s in class_stats(table, share_ratio=ratio)], **groups}
    out = []
    for key, items in groups.items():
        rows, marks, first = [], [], []
        for value, s in items:
            rules = by_scope.get(s.get("scope", ""), [])
            failed = [r for r in rules if r.verdict == "fail"]
            if failed:
                verdict, mark = "✗ FAIL: " + "; ".join(_failure(r) for r in failed), "v-fail"
            elif rules and all(r.verdict == "skip" for r in rules):
                verdict, mark = f"skip: {rules[0].reason}", "v-skip"
            else:
                verdict, mark = ("pass" if rules else "not judged"), ""
            rows.append([value, str(s["rows"]), str(s["ok"]), _fmt(s["mean_invalid_activation_ratio"]),
                         _fmt(s.get("p95_invalid_activation_ratio")), _fmt(s["share_images_over"]),
                         _fmt(s["peak_in_invalid_rate"]), _fmt(s["mean_excess_over_area"]), verdict])
            marks.append(mark)
            first.append(bool(failed))
        head = [key, "rows", "ok", "mean ratio", "p95 ratio", f"share > {ratio:g}", "peak rate", "mean excess",
                "verdict"]
        heading = "Per class" if key == "class" else f"Per slice: {key}"
        note = ["Not judged (the policy has no per_class): shown for the reviewer."] if unjudged and key == "class" \
            else []
        out.append((heading, [*note, _capped(head, rows, marks, first, limit,
                                             "scopes (failing ones are listed first)")]))
    return out


def _champion(d: Decision, results, baseline, limit: int, figures: bool) -> list:
    b = d.baseline
    worse_by = b.get("baseline_worse_by", 0) or 0
    parts: list = [Table(["statistic", "value"], [
        ["champion model", _text(b.get("model"))],
        ["champion weights sha256", _text(b.get("weights_sha256"))],
        ["images paired (by row and image)", _fmt(b.get("baseline_paired"))],
        ["images ok in both runs", _fmt(b.get("baseline_compared"))],
        ["champion mean ratio", _fmt(b.get("baseline_mean"))],
        ["challenger mean ratio (same images)", _fmt(b.get("baseline_candidate_mean"))],
        ["mean increase", _fmt(b.get("baseline_mean_increase"))],
        [f"share of images worse by > {worse_by:g}", _fmt(b.get("baseline_share_worse"))],
    ])]
    if results is None or baseline is None:
        return parts
    from ..gating.stats import pair_baseline

    pairs = pair_baseline(results, baseline)
    both = pairs[(pairs["status"] == "ok") & (pairs["status_baseline"] == "ok")].copy()
    both["delta"] = both["invalid_activation_ratio"] - both["invalid_activation_ratio_baseline"]
    both = both[np.isfinite(both["delta"])]
    if figures and len(both):
        from .plots import paired_png

        parts.append(Figure(paired_png(both["invalid_activation_ratio_baseline"].to_numpy(float),
                                        both["invalid_activation_ratio"].to_numpy(float), worse_by),
                             "champion ratio against challenger ratio per image",
                             f"{len(both)} images ok in both runs. Above the dashed line an image is worse by more "
                             f"than {worse_by:g}."))
    rose = both[both["delta"] > 0].sort_values("delta", ascending=False, kind="stable")
    parts.append(Sub("Images that got worse most"))
    if rose.empty:
        parts.append("(no image's ratio rose)")
        return parts
    shown = rose.head(min(WORSE, limit))
    rows = [[str(r.get("image_id") or r["image"]), _class_of(r), _fmt(r["invalid_activation_ratio_baseline"]),
             _fmt(r["invalid_activation_ratio"]), f"+{_fmt(r['delta'])}"] for r in shown.to_dict("records")]
    more = len(rose) - len(shown)
    parts.append(Table(["image", "class", "champion ratio", "challenger ratio", "delta"], rows,
                        more=f"... and {more} more images whose ratio rose" if more else ""))
    return parts




def _errors(table: pa.Table, top: int) -> tuple[list[list[str]], int]:
    status = table.column("status").cast(pa.string()).to_numpy(zero_copy_only=False)
    err = np.flatnonzero(status == "error")
    out = []
    for r in table.take(pa.array(err[:top], type=pa.int64())).to_pylist():
        msg = str(r.get("error") or "")
        cut = msg[:_MAX_ERROR_CHARS] + ("…" if len(msg) > _MAX_ERROR_CHARS else "")
        det = r.get("det_index")
        out.append([str(r.get("image_id", "")) + (f" (detection {det})" if det is not None else ""), cut])
    return out, max(0, len(err) - top)


def _top_parts(rows: list[dict], images: dict | None, classes, det: bool = False, per_class: bool = False) -> list:
    cells = []
    for r in rows:
        area = r.get("invalid_area_ratio")
        excess = r["invalid_activation_ratio"] - area if area is not None else None
        cells.append([str(r.get("image_id", "")), _class_of(r), _label_of(r, classes) or "",
                      _fmt(r["invalid_activation_ratio"]), _fmt(area), _fmt(excess),
                      {True: "yes", False: "no"}.get(r.get("peak_in_invalid"), "n/a")])
    # keyed by (row, det_index) in a detection run: several detections share an image's row
    keys = [detection.row_key(r, per_class) for r in rows]
    if not images or not any(k in images for k in keys):
        if det:
            return [Table(_DET_TOP_HEAD, [[c[0], _fmt(r.get("det_index")), detection.label_of(r),
                                           _fmt(r.get("det_score")), detection.box_text(r), detection.gt_text(r),
                                           c[3], c[4], c[5], _fmt(r.get("outside_box_ratio")),
                                           _fmt(r.get("box_invalid_area")), c[6]] for r, c in zip(rows, cells)])]
        return [Table(_TOP_HEAD, cells)]
    items = []
    for rank, (r, c, key) in enumerate(zip(rows, cells, keys), 1):
        score = r.get("predicted_score")
        if det:
            lines = [f"#{rank} {c[0]} (row {r['row']}, detection {_fmt(r.get('det_index'))})",
                     f"detected: {detection.caption(r) or 'n/a'} · box {detection.box_text(r)}",
                     *([f"ground truth: {detection.gt_text(r)}"] if detection.gt_text(r) != "n/a" else []),
                     f"ratio {c[3]} · area {c[4]} · excess {c[5]} · peak in invalid: {c[6]}",
                     f"outside box {_fmt(r.get('outside_box_ratio'))} · box invalid area "
                     f"{_fmt(r.get('box_invalid_area'))}"]
        else:
            lines = [f"#{rank} {c[0]} (row {r['row']})",
                     f"predicted: {c[1] or 'n/a'}" + (f" ({score:.2f})" if isinstance(score, float) else ""),
                     *([f"label: {c[2]}"] if c[2] else []),
                     f"ratio {c[3]} · area {c[4]} · excess {c[5]} · peak in invalid: {c[6]}"]
        items.append((images.get(key), lines))
    return [Gallery(items, boxes=det)]


def _det_counts(summary: dict) -> list:
    return [Table(["images", "detections", "rows", *detection.STATUSES],
                  [[str(summary[k]) for k in ("images", "detections", "rows", *detection.STATUSES)]]),
            "A detection run: one row per detection explained (an image and its detection index); an image "
            "without any detection is one no_detection row, a ground-truth box no detection matched one missed "
            "row (neither has a map)."]


def _class_counts(objects: dict) -> list:
    empty = "no_region" if objects["task"] == "segmentation" else "no_label"
    head = ["images", "rows", "explained", "ok", "no_activation", "error", empty]
    what = ("its class's region (the predicted pixels), outlined in cyan in the overlays; a named class without "
            "a pixel, or an image without any class, is a no_region row") if empty == "no_region" else \
        "its label's logit; an image without a positive label is one no_label row"
    per_class = ", ".join(f"{k} {v}" for k, v in objects["classes"].items())
    return [Table(head, [[str(objects[k]) for k in head]]),
            f"A {objects['task']} run: one row per (image, class explained), the map explaining {what}. "
            f"Rows explained per class: {per_class or 'none'}."]


def _det_sections(table: pa.Table, share_ratio: float, limit: int) -> list:
    """A detection run's own tables: per detected class (detections, missed, box figures), then each
    detection with its label, score, box and ratios (those over the share ratio kept first when capped)."""
    rows = table.to_pylist()
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") != "no_detection":
            by_class[detection.label_of(r) or "n/a"].append(r)

    def mean(rs, key):
        v = [float(r[key]) for r in rs if r.get("status") == "ok" and _given(r.get(key))]
        v = [x for x in v if math.isfinite(x)]
        return float(np.mean(v)) if v else None

    per_class = []
    for name in sorted(by_class, key=lambda n: (min(_det_class(r) for r in by_class[n]), n)):
        rs = by_class[name]
        status = [r.get("status") for r in rs]
        per_class.append([name, str(sum(_given(r.get("det_index")) for r in rs)), str(status.count("ok")),
                          str(status.count("missed")), _fmt(mean(rs, "det_score")),
                          _fmt(mean(rs, "invalid_activation_ratio")), _fmt(mean(rs, "outside_box_ratio")),
                          _fmt(mean(rs, "box_invalid_area"))])
    class_table = _capped(["class", "detections", "ok", "missed", "mean score", "mean ratio", "mean outside box",
                           "mean box invalid area"], per_class, None, [False] * len(per_class), limit, "classes")

    rows.sort(key=lambda r: (r.get("row") if _given(r.get("row")) else math.inf,
                             r.get("det_index") if _given(r.get("det_index")) else math.inf))
    cells, first = [], []
    for r in rows:
        ratio = r.get("invalid_activation_ratio")
        cells.append([str(r.get("image_id", "")), _fmt(r.get("row")), _fmt(r.get("det_index")), str(r.get("status")),
                      detection.label_of(r), _fmt(r.get("det_score")), detection.box_text(r), detection.gt_text(r),
                      _fmt(ratio), _fmt(r.get("outside_box_ratio")), _fmt(r.get("box_invalid_area"))])
        first.append(r.get("status") == "ok" and _given(ratio) and ratio > share_ratio)
    head = ["image", "row", "detection", "status", "class", "score", "box (x1, y1, x2, y2)", "ground truth", "ratio",
            "outside box", "box invalid area"]
    det_table = _capped(head, cells, None, first, limit, f"rows (those with ratio > {share_ratio:g} are listed first)")
    return [Sub("Per detected class"), class_table, Sub("Per detection"),
            "Boxes in original image pixels; outside box: the share of the map's heat outside the box; box invalid "
            "area: the share of the box's pixels that are invalid.", det_table]


def _det_class(r: dict) -> float:
    for key in ("det_class", "predicted_class"):
        if _given(r.get(key)):
            return float(r[key])
    return math.inf


_RULE_HEAD = ["rule", "scope", "value", "threshold", "n", "verdict"]
_TOP_HEAD = ["image", "class", "label", "ratio", "area ratio", "excess", "peak in invalid"]
_DET_TOP_HEAD = ["image", "detection", "class", "score", "box (x1, y1, x2, y2)", "ground truth", "ratio", "area ratio",
                 "excess", "outside box", "box invalid area", "peak in invalid"]


def build_page(d: Decision, results, title: str | None, top: int, ctx: dict | None, fmt: str,
          images: dict | None = None) -> Page:
    """The sections both renderers show; ``fmt`` 'html' adds figures and the gallery."""
    ctx = ctx or {}
    rec = ctx.get("record")
    limit, html = MAX_ROWS[fmt], fmt == "html"
    p = Page(title or f"camgate gate: {d.policy}", _verdict_line(d, top), notes=list(d.warnings))
    if d.trusted is not None:  # were the heatmaps behind the verdict shown to be faithful?
        p.trust, p.trusted = f"Heatmaps {'trusted' if d.trusted else 'NOT trusted'}: {d.trust_reason}", d.trusted
    if rec:
        p.sections.append(("Model and data", [_identity(rec)]))
    o = d.overall
    table = None
    if results is not None:
        table = read_results(results, RESULT_COLUMNS + ("predicted_score", "target_class", "outside_region_ratio",
                                                        "region_invalid_area") + detection.COLUMNS)
    det = table is not None and detection.is_detection(table)
    summary = detection.summary(table) if det else None
    task = detection.class_task(table) if table is not None else None
    objects = detection.class_summary(table, task) if task else None
    counts = [Table(["rows", "ok", "no_activation", "error"],
                    [[str(d.counts.get(k, 0)) for k in ("rows", "ok", "no_activation", "error")]])]
    p.sections += [
        ("Counts", _det_counts(summary) if det else _class_counts(objects) if objects else counts),
        ("Overall", [Table(["statistic", "value"], [
            ["mean invalid activation ratio", _fmt(o.get("mean_invalid_activation_ratio"))],
            ["p95 invalid activation ratio", _fmt(o.get("p95_invalid_activation_ratio"))],
            [f"share of images with ratio > {o.get('share_over_ratio', 0.5):g}", _fmt(o.get("share_images_over"))],
            ["peak-in-invalid rate", _fmt(o.get("peak_in_invalid_rate"))],
            ["mean invalid area ratio", _fmt(o.get("mean_invalid_area_ratio"))],
            ["mean excess over area", _fmt(o.get("mean_excess_over_area"))],
            ["error rate", _fmt(o.get("error_rate"))],
            ["no-activation rate", _fmt(o.get("no_activation_rate"))],
            *([["mean outside-box ratio (ok detections)", _fmt(detection.mean_of(table, "outside_box_ratio"))],
               ["mean box invalid area (ok detections)", _fmt(detection.mean_of(table, "box_invalid_area"))]]
              if det else []),
            *([["mean outside-region ratio (ok rows)", _fmt(detection.mean_of(table, "outside_region_ratio"))],
               ["mean region invalid area (ok rows)", _fmt(detection.mean_of(table, "region_invalid_area"))]]
              if task == "segmentation" else [])])]),
        ("Rules", [_capped(_RULE_HEAD, [[_rule_name(r), r.scope, _fmt(r.value), f"{_OPS[r.op]} {_fmt(r.threshold)}",
                                         str(r.n), r.verdict + (f": {r.reason}" if r.reason else "")] for r in d.rules],
                           [f"v-{r.verdict}" for r in d.rules],
                           [r.scope == "all" or r.verdict == "fail" for r in d.rules],  # kept when capped
                           limit, "rules (passed or skipped; every rule is in record.json and junit.xml)")]),
    ]
    faith = _faithfulness(o, rec)
    if faith:
        p.sections.append(("Faithfulness of the heatmaps", faith))
    if table is not None:
        p.sections.append(("Invalid activation ratio vs invalid area",
                           _distribution(table, o.get("share_over_ratio", 0.5), html)))
    p.sections += _scopes(d, table, limit)
    if det:
        p.sections.append(("Detections", _det_sections(table, o.get("share_over_ratio", 0.5), limit)))
    if d.baseline:
        p.sections.append(("Champion vs challenger", _champion(d, results, ctx.get("baseline"), limit, html)))
    if table is not None:
        rows = worst_rows(table, top)[1]
        classes = ((rec or {}).get("model") or {}).get("classes")
        what = "detections" if det else "images"
        p.sections.append((f"Top {len(rows) or int(top)} {what} by invalid activation ratio",
                           _top_parts(rows, images if html else None, classes, det,
                                      detection.per_class_task(run_metadata(table)))
                           if rows else [f"(no ok {what})"]))
        errors, more = _errors(table, top)
        if errors:
            p.sections.append(("Errors", [Table(["image", "error"], errors,
                                                 more=f"... and {more} more" if more else "")]))
    if rec:
        p.sections.append(("Evidence: the EU's seven requirements for trustworthy AI",
                           [Table(["requirement", "what this run shows", "what it does not show"],
                                   [[r["requirement"], r["shows"], r["does_not_show"]] for r in rec["requirements"]])]))
        p.footer = [f"Test record sha256: {ctx.get('record_sha256')}",
                    "Approval (for the responsible person): name ______ role ______ date ______ "
                    "decision ______ signature ______"]
    return p
