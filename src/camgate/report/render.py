"""Human-readable views of a gate decision: Markdown and self-contained HTML.

Both are built from one list of sections (:func:`_page`), so they say the same; the HTML adds the
figures and the gallery of overlays. Every piece of text that comes from data (image ids, class
names, errors, scope values, URIs, the policy name) is escaped: a results file is input, and a
report is opened in a browser. The Markdown holds no HTML at all (KFP's viewer disables it).

Tables are capped (failing rows kept first) and the gallery holds :data:`GALLERY` small pictures,
so a run of any size gives an HTML page under 10 MB and Markdown under 400,000 characters; every
rule is in ``record.json`` and ``junit.xml`` whatever the page leaves out.
"""
from __future__ import annotations
import base64
import html as _html
import math
from collections import defaultdict
from dataclasses import dataclass, field
import numpy as np
import pyarrow as pa
from ..io.results import RESULT_COLUMNS, read_results
from ..gating.decision import Decision, RuleResult
from ..gating.stats import class_stats
from .overlays import GALLERY, _jet, _worst

MAX_ROWS = {"html": 300, "md": 50}  # rows per table
WORSE = 10  # images listed as worse than with the champion
_OPS = {"<=": "≤", ">=": "≥"}
_NOT = {"<=": ">", ">=": "<"}
_MAX_ERROR_CHARS = 300
_QUANTILES = (("min", 0), ("p5", 5), ("p25", 25), ("median", 50), ("p75", 75), ("p95", 95), ("max", 100))


# --------------------------------------------------------------------------- content


@dataclass
class _Table:
    head: list[str]
    rows: list[list[str]]
    marks: list[str] | None = None  # CSS class per row (HTML): v-pass | v-fail | v-skip
    more: str = ""  # "... and N more" under a capped table


@dataclass
class _Figure:  # HTML only
    image: bytes
    alt: str
    caption: str = ""


@dataclass
class _Gallery:  # HTML only: (picture or None, caption lines) per image
    items: list[tuple[bytes | None, list[str]]]


@dataclass
class _Sub:  # a sub-heading
    text: str


@dataclass
class _Page:
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
    return r.rule


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


def _capped(head, rows, marks, first, limit, what: str) -> _Table:
    keep, more = _cap(rows, first, limit)
    return _Table(head, [rows[i] for i in keep], [marks[i] for i in keep] if marks else None,
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


def _identity(rec: dict) -> _Table:
    """Which model, data, method and policy the verdict is about, with the hashes an auditor checks."""
    m, data, meth, pol = rec["model"], rec["data"], rec["method"], rec["policy"]
    env = rec.get("environment") or {}
    res = (rec.get("files") or {}).get("results") or {}
    size = meth.get("map_resolution")
    rows = [
        ["model", f"{_text(m.get('name'))} ({m.get('kind') or 'torch'}: {_text(m.get('arch'))})"],
        ["model card sha256", _text(m.get("card_sha256"))],
        ["weights sha256", _text(m.get("weights_sha256"))],
        ["method", f"{_text(meth.get('name'))}, explaining the {_text(meth.get('target'))} class"],
        ["target layer", _text(meth.get("target_layer"))],
        ["map resolution", f"{size[0]} × {size[1]}" if size else "n/a"],
        ["data manifest", _text(data.get("manifest"))],
        ["data manifest sha256", _text(data.get("manifest_sha256"))],
        ["policy", f"{_text(pol.get('name'))} ({_text(pol.get('uri'))})"],
        ["policy sha256", _text(pol.get("sha256"))],
        ["results", f"{_text(res.get('uri'))} (sha256 {_text(res.get('sha256'))})"],
        ["software", f"camgate {rec.get('camgate_version')}, torch {_text(env.get('torch'))} on "
                     f"{_text(env.get('device'))}"],
        ["heatmaps computed", _text((rec.get("times") or {}).get("heatmaps_started_at"))],
    ]
    return _Table(["what", "value"], rows)


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
    parts: list = [_Table(["over ok images", *(n for n, _ in _QUANTILES)], rows)]
    if figures:
        from .plots import ratio_area_png

        parts.insert(0, _Figure(ratio_area_png(ratio, area, share_ratio),
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
    parts: list = [_Table(["statistic", "value"], [
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

        parts.append(_Figure(paired_png(both["invalid_activation_ratio_baseline"].to_numpy(float),
                                        both["invalid_activation_ratio"].to_numpy(float), worse_by),
                             "champion ratio against challenger ratio per image",
                             f"{len(both)} images ok in both runs. Above the dashed line an image is worse by more "
                             f"than {worse_by:g}."))
    rose = both[both["delta"] > 0].sort_values("delta", ascending=False, kind="stable")
    parts.append(_Sub("Images that got worse most"))
    if rose.empty:
        parts.append("(no image's ratio rose)")
        return parts
    shown = rose.head(min(WORSE, limit))
    rows = [[str(r.get("image_id") or r["image"]), _class_of(r), _fmt(r["invalid_activation_ratio_baseline"]),
             _fmt(r["invalid_activation_ratio"]), f"+{_fmt(r['delta'])}"] for r in shown.to_dict("records")]
    more = len(rose) - len(shown)
    parts.append(_Table(["image", "class", "champion ratio", "challenger ratio", "delta"], rows,
                        more=f"... and {more} more images whose ratio rose" if more else ""))
    return parts




def _errors(table: pa.Table, top: int) -> tuple[list[list[str]], int]:
    status = table.column("status").cast(pa.string()).to_numpy(zero_copy_only=False)
    err = np.flatnonzero(status == "error")
    out = []
    for r in table.take(pa.array(err[:top], type=pa.int64())).to_pylist():
        msg = str(r.get("error") or "")
        cut = msg[:_MAX_ERROR_CHARS] + ("…" if len(msg) > _MAX_ERROR_CHARS else "")
        out.append([str(r.get("image_id", "")), cut])
    return out, max(0, len(err) - top)


def _top_parts(rows: list[dict], images: dict | None, classes) -> list:
    cells = []
    for r in rows:
        area = r.get("invalid_area_ratio")
        excess = r["invalid_activation_ratio"] - area if area is not None else None
        cells.append([str(r.get("image_id", "")), _class_of(r), _label_of(r, classes) or "",
                      _fmt(r["invalid_activation_ratio"]), _fmt(area), _fmt(excess),
                      {True: "yes", False: "no"}.get(r.get("peak_in_invalid"), "n/a")])
    if not images or not any(r["row"] in images for r in rows):
        return [_Table(_TOP_HEAD, cells)]
    items = []
    for rank, (r, c) in enumerate(zip(rows, cells), 1):
        score = r.get("predicted_score")
        lines = [f"#{rank} {c[0]} (row {r['row']})",
                 f"predicted: {c[1] or 'n/a'}" + (f" ({score:.2f})" if isinstance(score, float) else ""),
                 *([f"label: {c[2]}"] if c[2] else []),
                 f"ratio {c[3]} · area {c[4]} · excess {c[5]} · peak in invalid: {c[6]}"]
        items.append((images.get(r["row"]), lines))
    return [_Gallery(items)]


_RULE_HEAD = ["rule", "scope", "value", "threshold", "n", "verdict"]
_TOP_HEAD = ["image", "class", "label", "ratio", "area ratio", "excess", "peak in invalid"]


def _page(d: Decision, results, title: str | None, top: int, ctx: dict | None, fmt: str,
          images: dict | None = None) -> _Page:
    """The sections both renderers show; ``fmt`` 'html' adds figures and the gallery."""
    ctx = ctx or {}
    rec = ctx.get("record")
    limit, html = MAX_ROWS[fmt], fmt == "html"
    p = _Page(title or f"camgate gate: {d.policy}", _verdict_line(d, top), notes=list(d.warnings))
    if d.trusted is not None:  # were the heatmaps behind the verdict shown to be faithful?
        p.trust, p.trusted = f"Heatmaps {'trusted' if d.trusted else 'NOT trusted'}: {d.trust_reason}", d.trusted
    if rec:
        p.sections.append(("Model and data", [_identity(rec)]))
    o = d.overall
    p.sections += [
        ("Counts", [_Table(["rows", "ok", "no_activation", "error"], [[str(v) for v in d.counts.values()]])]),
        ("Overall", [_Table(["statistic", "value"], [
            ["mean invalid activation ratio", _fmt(o.get("mean_invalid_activation_ratio"))],
            ["p95 invalid activation ratio", _fmt(o.get("p95_invalid_activation_ratio"))],
            [f"share of images with ratio > {o.get('share_over_ratio', 0.5):g}", _fmt(o.get("share_images_over"))],
            ["peak-in-invalid rate", _fmt(o.get("peak_in_invalid_rate"))],
            ["mean invalid area ratio", _fmt(o.get("mean_invalid_area_ratio"))],
            ["mean excess over area", _fmt(o.get("mean_excess_over_area"))],
            ["error rate", _fmt(o.get("error_rate"))],
            ["no-activation rate", _fmt(o.get("no_activation_rate"))]])]),
        ("Rules", [_capped(_RULE_HEAD, [[_rule_name(r), r.scope, _fmt(r.value), f"{_OPS[r.op]} {_fmt(r.threshold)}",
                                         str(r.n), r.verdict + (f": {r.reason}" if r.reason else "")] for r in d.rules],
                           [f"v-{r.verdict}" for r in d.rules],
                           [r.scope == "all" or r.verdict == "fail" for r in d.rules],  # kept when capped
                           limit, "rules (passed or skipped; every rule is in record.json and junit.xml)")]),
    ]
    table = None
    if results is not None:
        table = read_results(results, RESULT_COLUMNS + ("predicted_score",))
        p.sections.append(("Invalid activation ratio vs invalid area",
                           _distribution(table, o.get("share_over_ratio", 0.5), html)))
    p.sections += _scopes(d, table, limit)
    if d.baseline:
        p.sections.append(("Champion vs challenger", _champion(d, results, ctx.get("baseline"), limit, html)))
    if table is not None:
        rows = _worst(table, top)[1]
        classes = ((rec or {}).get("model") or {}).get("classes")
        p.sections.append((f"Top {len(rows) or int(top)} images by invalid activation ratio",
                           _top_parts(rows, images if html else None, classes) if rows else ["(no ok images)"]))
        errors, more = _errors(table, top)
        if errors:
            p.sections.append(("Errors", [_Table(["image", "error"], errors,
                                                 more=f"... and {more} more" if more else "")]))
    if rec:
        p.sections.append(("Evidence: the EU's seven requirements for trustworthy AI",
                           [_Table(["requirement", "what this run shows", "what it does not show"],
                                   [[r["requirement"], r["shows"], r["does_not_show"]] for r in rec["requirements"]])]))
        p.footer = [f"Test record sha256: {ctx.get('record_sha256')}",
                    "Approval (for the responsible person): name ______ role ______ date ______ "
                    "decision ______ signature ______"]
    return p


# --------------------------------------------------------------------------- markdown


def _md(text) -> str:
    # Entities first (renderers may pass raw HTML through), then code/link/table syntax; emphasis
    # characters stay readable since they cannot inject anything.
    s = _html.escape(str(text), quote=False)
    for ch in "\\`[]|":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def _md_table(t: _Table) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in t.head) + " |", "|" + "---|" * len(t.head)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in t.rows]
    return lines + [""] + ([_md(t.more), ""] if t.more else [])


def markdown(decision: Decision, results=None, title: str | None = None, top: int = GALLERY,
             context: dict | None = None) -> str:
    """Markdown summary (KFP Output[Markdown]), no HTML in it; ``results`` (table or Parquet path/URI)
    adds the distribution, per-class table, the top-``top`` images by ratio and the error rows;
    ``context`` (from :func:`camgate.report.artifacts`) the model, champion, evidence and record."""
    p = _page(decision, results, title, top, context, "md")
    out = [f"# {_md(p.title)}", "", f"**{_md(p.verdict)}**", ""]
    if p.trust:
        out += [f"**{_md(p.trust)}**", ""]
    out += [f"- Warning: {_md(n)}" for n in p.notes] + ([""] if p.notes else [])
    for heading, parts in p.sections:
        out += [f"## {_md(heading)}", ""]
        for part in parts:
            if isinstance(part, _Table):
                out += _md_table(part)
            elif isinstance(part, _Sub):
                out += [f"### {_md(part.text)}", ""]
            elif isinstance(part, str):
                out += [_md(part), ""]
    out += [_md(f) + "  " for f in p.footer]
    return "\n".join(out)


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1b1f24;max-width:80rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #d0d7de}h3{font-size:1rem}
table{border-collapse:collapse;margin:.4rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.ident td:first-child{font-weight:600;white-space:nowrap}
table.ident td:last-child{font-family:ui-monospace,monospace;font-size:.8rem;word-break:break-all}
.verdict{padding:.6rem .8rem;border-radius:6px;font-weight:600}
.pass .verdict,.v-pass,.trusted{background:#dafbe1;color:#116329}
.fail .verdict,.v-fail,.untrusted{background:#ffebe9;color:#a40e26}
tr.v-fail td:last-child{font-weight:600}
.v-skip{background:#fff8c5;color:#7d4e00}
.trusted,.untrusted{padding:.4rem .8rem;border-radius:6px}
.warning{background:#fff8c5;color:#7d4e00;padding:.4rem .8rem;border-radius:6px}
.record{font-family:ui-monospace,monospace;font-size:.85rem}
figure{margin:.6rem 0}figcaption{font-size:.8rem;color:#57606a}
img.plot{max-width:100%;border:1px solid #d0d7de}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.8rem}
.gallery figure{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:.4rem}
.gallery figcaption{color:#1b1f24;overflow-wrap:anywhere}
img.overlay{width:100%;max-width:330px;display:block;image-rendering:auto}
.legend{font-size:.85rem;display:flex;gap:1.2rem;align-items:center;flex-wrap:wrap;margin:.4rem 0}
.ramp{display:inline-block;width:12rem;height:.8rem;border:1px solid #57606a;vertical-align:middle}
.outline{display:inline-block;width:1.4rem;height:.8rem;background:#c9a0c9;border:2px solid #fff;
outline:1px solid #000;vertical-align:middle}
td.err{font-family:ui-monospace,monospace;white-space:pre-wrap;max-width:60rem}
"""


def _e(text) -> str:
    return _html.escape(str(text), quote=True)


def _data_uri(image: bytes) -> str:
    mime = "image/jpeg" if image[:2] == b"\xff\xd8" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def _num(cell: str) -> bool:
    try:
        float(cell.lstrip("≤≥+ "))
        return True
    except ValueError:
        return False


def _html_table(t: _Table, cls: str = "", err_column: int | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    out = [f"<table{attr}><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in t.head) + "</tr></thead><tbody>"]
    for i, row in enumerate(t.rows):
        mark = f' class="{_e(t.marks[i])}"' if t.marks and t.marks[i] else ""
        cells = "".join(f'<td class="err">{_e(c)}</td>' if j == err_column else
                        f'<td{" class=num" if _num(c) else ""}>{_e(c)}</td>' for j, c in enumerate(row))
        out.append(f"<tr{mark}>{cells}</tr>")
    out.append("</tbody></table>")
    if t.more:
        out.append(f"<p>{_e(t.more)}</p>")
    return "".join(out)


def _ramp() -> str:
    """The overlays' colour scale as a CSS gradient: the same function colours the pictures."""
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in (np.round(_jet(np.linspace(0, 1, 9)) * 255).astype(int)))
    return f'<span class="ramp" style="background:linear-gradient(to right, {stops})"></span>'


def _html_gallery(g: _Gallery) -> str:
    legend = (f'<div class="legend"><span>Each picture: left, the image as the model saw it; right, the heatmap '
              f'over it.</span><span><span class="outline"></span> invalid pixels (the mask): outlined, tinted on '
              f'the left</span><span>heatmap, scaled to each image\'s maximum: 0 {_ramp()} 1</span></div>')
    cards = []
    for image, lines in g.items:
        pic = (f'<img class="overlay" alt="{_e(lines[0])}" src="{_data_uri(image)}">' if image
               else "<p>(picture not available: the image could not be read)</p>")
        cards.append(f"<figure>{pic}<figcaption>{'<br>'.join(_e(s) for s in lines)}</figcaption></figure>")
    return legend + '<div class="gallery">' + "".join(cards) + "</div>"


def html(decision: Decision, results=None, title: str | None = None, top: int = GALLERY,
         images: dict[int, bytes] | None = None, context: dict | None = None) -> str:
    """Self-contained HTML page (inline CSS, images as data: URIs, no script). ``images`` maps a
    result's ``row`` to the picture of its overlay (:func:`overlays`), shown for the top images."""
    p = _page(decision, results, title, top, context, "html", images)
    state = "pass" if decision.passed else "fail"
    body = [f"<h1>{_e(p.title)}</h1>", f'<p class="verdict">{_e(p.verdict)}</p>']
    if p.trust:
        body.append(f'<p class="{"trusted" if p.trusted else "untrusted"}">{_e(p.trust)}</p>')
    body += [f'<p class="warning">Warning: {_e(n)}</p>' for n in p.notes]
    for heading, parts in p.sections:
        body.append(f"<h2>{_e(heading)}</h2>")
        for part in parts:
            if isinstance(part, _Table):
                body.append(_html_table(part, "ident" if heading == "Model and data" else "",
                                        1 if heading == "Errors" else None))
            elif isinstance(part, _Figure):
                body.append(f'<figure><img class="plot" alt="{_e(part.alt)}" src="{_data_uri(part.image)}">'
                            f"<figcaption>{_e(part.caption)}</figcaption></figure>")
            elif isinstance(part, _Gallery):
                body.append(_html_gallery(part))
            elif isinstance(part, _Sub):
                body.append(f"<h3>{_e(part.text)}</h3>")
            else:
                body.append(f"<p>{_e(part)}</p>")
    body += [f'<p class="record">{_e(f)}</p>' for f in p.footer]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(p.title)}</title><style>{_CSS}</style></head>"
            f'<body class="{state}">\n' + "\n".join(body) + "\n</body></html>\n")
