"""Human-readable views of a gate decision: Markdown and self-contained HTML.

Every piece of text that comes from data (image ids, class names, errors, scope values, the
policy name) is escaped: a results file is input, and a report is opened in a browser.
"""
from __future__ import annotations

import base64
import html as _html
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..gate import Decision, RuleResult, class_stats, read_results

_OPS = {"<=": "≤", ">=": "≥"}
_MAX_ERROR_CHARS = 300
# --------------------------------------------------------------------------- content


@dataclass
class _Content:
    title: str
    verdict: str
    counts: list[tuple[str, str]]
    overall: list[tuple[str, str]]
    rules: list[list[str]]
    rule_verdicts: list[str]
    classes: list[list[str]] | None
    top: list[tuple[int, list[str]]] | None  # (row, cells)
    errors: list[tuple[str, str]] | None
    errors_more: int
    notes: list[str] = None  # warnings: shown under the verdict
    sections: list[tuple[str, list[str], list[list[str]]]] = None  # (heading, table head, rows) after the rules
    footer: list[str] = None  # record hash, approval


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _rule_name(r: RuleResult) -> str:
    if r.rule == "share_images_over" and "ratio" in r.params:
        return f"share_images_over (ratio > {r.params['ratio']:g})"
    return r.rule


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


def _class_of(row: dict) -> str:
    for key in ("predicted_label", "predicted_class", "label"):
        if row.get(key) is not None:
            return str(row[key])
    return ""


def _context_parts(d: Decision, ctx: dict | None):
    """Warnings, the baseline and evidence tables and the record lines, from the artifacts' context."""
    notes = list(d.warnings)
    sections = []
    if d.baseline:
        b = d.baseline
        sections.append(("Champion vs challenger", ["statistic", "value"], [
            ["champion model", str(b.get("model") or "n/a")],
            ["champion weights sha256", str(b.get("weights_sha256") or "n/a")],
            ["images paired (by row and image)", _fmt(b.get("baseline_paired"))],
            ["images ok in both runs", _fmt(b.get("baseline_compared"))],
            ["champion mean ratio", _fmt(b.get("baseline_mean"))],
            ["challenger mean ratio (same images)", _fmt(b.get("baseline_candidate_mean"))],
            ["mean increase", _fmt(b.get("baseline_mean_increase"))],
            [f"share of images worse by > {b.get('baseline_worse_by', 0):g}", _fmt(b.get("baseline_share_worse"))],
        ]))
    footer = []
    if ctx and ctx.get("record"):
        rec = ctx["record"]
        sections.append(("Evidence: the EU's seven requirements for trustworthy AI",
                         ["requirement", "what this run shows", "what it does not show"],
                         [[r["requirement"], r["shows"], r["does_not_show"]] for r in rec["requirements"]]))
        footer.append(f"Test record sha256: {ctx.get('record_sha256')}")
        footer.append("Approval (for the responsible person): name ______ role ______ date ______ "
                      "decision ______ signature ______")
    return notes, sections, footer


def _content(d: Decision, results, title: str | None, top: int, ctx: dict | None = None) -> _Content:
    rules = [[_rule_name(r), r.scope, _fmt(r.value), f"{_OPS[r.op]} {_fmt(r.threshold)}", str(r.n),
              r.verdict + (f": {r.reason}" if r.reason else "")] for r in d.rules]
    o = d.overall
    overall = [
        ("mean invalid activation ratio", _fmt(o.get("mean_invalid_activation_ratio"))),
        (f"share of images with ratio > {o.get('share_over_ratio', 0.5):g}", _fmt(o.get("share_images_over"))),
        ("peak-in-invalid rate", _fmt(o.get("peak_in_invalid_rate"))),
        ("mean invalid area ratio", _fmt(o.get("mean_invalid_area_ratio"))),
        ("mean excess over area", _fmt(o.get("mean_excess_over_area"))),
        ("error rate", _fmt(o.get("error_rate"))),
        ("no-activation rate", _fmt(o.get("no_activation_rate"))),
    ]
    verdict = _verdict_line(d, top)
    if d.trusted is not None:  # the trust line: were the heatmaps behind the verdict shown to be faithful?
        verdict += f". Heatmaps {'trusted' if d.trusted else 'NOT trusted'}: {d.trust_reason}"
    c = _Content(title or f"camgate gate: {d.policy}", verdict,
                 [(k, str(v)) for k, v in d.counts.items()], overall, rules,
                 [r.verdict for r in d.rules], None, None, None, 0, *_context_parts(d, ctx))
    if results is None:
        return c

    table = read_results(results)
    c.classes = [[s["class"], str(s["rows"]), str(s["ok"]), _fmt(s["mean_invalid_activation_ratio"]),
                  _fmt(s["peak_in_invalid_rate"]), _fmt(s["mean_excess_over_area"])]
                 for s in class_stats(table, share_ratio=o.get("share_over_ratio", 0.5))]
    c.top, c.errors, c.errors_more = _top_and_errors(table, top)
    return c


def _top_and_errors(table: pa.Table, top: int):
    status = table.column("status").cast(pa.string()).to_numpy()
    ratio = table.column("invalid_activation_ratio").cast(pa.float64()).to_numpy()
    ok = np.flatnonzero((status == "ok") & ~np.isnan(ratio))
    order = ok[np.argsort(-ratio[ok], kind="stable")][:top]
    pick = table.take(pa.array(order, type=pa.int64())).to_pylist()
    rows = []
    for position, r in zip(order, pick):
        area = r.get("invalid_area_ratio")
        excess = r["invalid_activation_ratio"] - area if area is not None else None
        # keyed by `row`: image ids repeat (duplicate rows, one stem in two folders)
        rows.append((int(r.get("row", position)), [
            str(r.get("image_id", "")), _class_of(r), _fmt(r["invalid_activation_ratio"]), _fmt(area),
            _fmt(excess), {True: "yes", False: "no"}.get(r.get("peak_in_invalid"), "n/a")]))

    err = np.flatnonzero(status == "error")
    errors = []
    for r in table.take(pa.array(err[:top], type=pa.int64())).to_pylist():
        msg = str(r.get("error") or "")
        if len(msg) > _MAX_ERROR_CHARS:
            msg = msg[:_MAX_ERROR_CHARS] + "…"
        errors.append((str(r.get("image_id", "")), msg))
    return rows, errors, max(0, len(err) - top)


_CLASS_HEAD = ["class", "rows", "ok", "mean ratio", "peak rate", "mean excess"]
_RULE_HEAD = ["rule", "scope", "value", "threshold", "n", "verdict"]
_TOP_HEAD = ["image", "class", "ratio", "area ratio", "excess", "peak in invalid"]


# --------------------------------------------------------------------------- markdown


def _md(text) -> str:
    # Entities first (renderers may pass raw HTML through), then code/link/table syntax; emphasis
    # characters stay readable since they cannot inject anything.
    s = _html.escape(str(text), quote=False)
    for ch in "\\`[]|":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(decision: Decision, results=None, title: str | None = None, top: int = 10,
             context: dict | None = None) -> str:
    """Markdown summary (KFP Output[Markdown]); ``results`` (table or Parquet path/URI) adds
    the per-class table, the top-``top`` images by ratio and the error rows; ``context`` (from
    :func:`camgate.report.artifacts`) the champion, evidence and record sections."""
    c = _content(decision, results, title, top, context)
    out = [f"# {_md(c.title)}", "", f"**{_md(c.verdict)}**", ""]
    out += [f"- Warning: {_md(n)}" for n in c.notes] + ([""] if c.notes else [])
    out += ["## Counts", ""] + _md_table(["rows", "ok", "no_activation", "error"],
                                         [[v for _, v in c.counts]])
    out += ["## Overall", ""] + _md_table(["statistic", "value"], [list(p) for p in c.overall])
    out += ["## Rules", ""] + _md_table(_RULE_HEAD, c.rules)
    for heading, head, rows in c.sections:
        out += [f"## {_md(heading)}", ""] + _md_table(head, rows)
    if c.classes is not None:
        out += ["## Per class", ""] + (_md_table(_CLASS_HEAD, c.classes) if c.classes else ["(no classes)", ""])
    if c.top is not None:
        out += [f"## Top {top} images by invalid activation ratio", ""]
        out += _md_table(_TOP_HEAD, [cells for _, cells in c.top]) if c.top else ["(no ok images)", ""]
    if c.errors:
        out += ["## Errors", ""] + _md_table(["image", "error"], [list(e) for e in c.errors])
        if c.errors_more:
            out += [f"... and {c.errors_more} more", ""]
    out += [_md(f) + "  " for f in c.footer]
    return "\n".join(out)


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1b1f24}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;margin:.4rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.6rem .8rem;border-radius:6px;font-weight:600}
.pass .verdict,.v-pass{background:#dafbe1;color:#116329}
.fail .verdict,.v-fail{background:#ffebe9;color:#a40e26}
.v-skip{background:#fff8c5;color:#7d4e00}
.warning{background:#fff8c5;color:#7d4e00;padding:.4rem .8rem;border-radius:6px}
.record{font-family:ui-monospace,monospace;font-size:.85rem}
img.overlay{max-width:160px;max-height:160px;display:block}
td.err{font-family:ui-monospace,monospace;white-space:pre-wrap;max-width:60rem}
"""


def _e(text) -> str:
    return _html.escape(str(text), quote=True)


def _html_table(head: list[str], rows: list[list[str]], row_class: list[str] | None = None,
                raw_last: bool = False) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{_e(row_class[i])}"' if row_class else ""
        cells = []
        for j, cell in enumerate(row):
            if raw_last and j == len(row) - 1:
                cells.append(f"<td>{cell}</td>")  # pre-rendered, already escaped
            else:
                num = ' class="num"' if _fmt_is_num(cell) else ""
                cells.append(f"<td{num}>{_e(cell)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _fmt_is_num(cell: str) -> bool:
    try:
        float(cell.lstrip("≤≥ "))
        return True
    except ValueError:
        return False


def html(decision: Decision, results=None, title: str | None = None, top: int = 10,
         images: dict[str, bytes] | None = None, context: dict | None = None) -> str:
    """Self-contained HTML page (inline CSS, no external assets). ``images`` maps a result's ``row``
    to PNG bytes of its heatmap overlay, embedded for the top images."""
    c = _content(decision, results, title, top, context)
    state = "pass" if decision.passed else "fail"
    body = [f"<h1>{_e(c.title)}</h1>", f'<p class="verdict">{_e(c.verdict)}</p>',
            *[f'<p class="warning">Warning: {_e(n)}</p>' for n in c.notes],
            "<h2>Counts</h2>", _html_table(["rows", "ok", "no_activation", "error"], [[v for _, v in c.counts]]),
            "<h2>Overall</h2>", _html_table(["statistic", "value"], [list(p) for p in c.overall]),
            "<h2>Rules</h2>", _html_table(_RULE_HEAD, c.rules, [f"v-{v}" for v in c.rule_verdicts])]
    for heading, head, rows in c.sections:
        body += [f"<h2>{_e(heading)}</h2>", _html_table(head, rows)]
    if c.classes is not None:
        body += ["<h2>Per class</h2>", _html_table(_CLASS_HEAD, c.classes) if c.classes else "<p>(no classes)</p>"]
    if c.top is not None:
        body.append(f"<h2>Top {int(top)} images by invalid activation ratio</h2>")
        if not c.top:
            body.append("<p>(no ok images)</p>")
        else:
            with_img = bool(images) and any(i in images for i, _ in c.top)
            rows = []
            for key, cells in c.top:
                row = list(cells)
                if with_img:
                    png = (images or {}).get(key)
                    row.append(f'<img class="overlay" alt="{_e(cells[0])}" src="data:image/png;base64,'
                               f'{base64.b64encode(png).decode("ascii")}">' if png else "")
                rows.append(row)
            body.append(_html_table(_TOP_HEAD + (["overlay"] if with_img else []), rows, raw_last=with_img))
    if c.errors:
        body.append("<h2>Errors</h2><table><thead><tr><th>image</th><th>error</th></tr></thead><tbody>"
                    + "".join(f'<tr><td>{_e(i)}</td><td class="err">{_e(m)}</td></tr>' for i, m in c.errors)
                    + "</tbody></table>")
        if c.errors_more:
            body.append(f"<p>... and {c.errors_more} more</p>")
    body += [f'<p class="record">{_e(f)}</p>' for f in c.footer]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(c.title)}</title><style>{_CSS}</style></head>"
            f'<body class="{state}">\n' + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- heatmap overlays


def _jet(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1], the classic jet ramp (blue = cold, red = hot)."""
    return np.clip(1.5 - np.abs(4 * x[..., None] - np.array([3.0, 2.0, 1.0])), 0, 1)


def overlay_png(image: bytes, cam: np.ndarray, box: tuple[int, int, int, int], mask=None,
                width: int = 256) -> bytes:
    """The model's view of ``image`` (``box``) with the heatmap blended in and the invalid region
    (``mask``: bool array of the box) outlined in white."""
    import io

    import torch
    from PIL import Image

    from ..cam import normalized
    from ..data import decode_image

    img = decode_image(image, "overlay").crop(box)
    w, h = img.size
    size = (max(1, round(h * width / w)), width)
    base = np.asarray(img.resize(size[::-1], Image.BILINEAR), dtype=np.float32) / 255
    heat = normalized(torch.from_numpy(cam)[None].float(), size)[0].numpy()
    out = 0.55 * base + 0.45 * _jet(heat)
    if mask is not None:
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 1.0
    buf = io.BytesIO()
    Image.fromarray((out * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


_OVERLAY_COLUMNS = ["row", "image_id", "status", "invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid",
                    "predicted_label", "predicted_class", "label", "image", "mask", "cam", "cam_height",
                    "cam_width", "image_width", "image_height"]


def overlays(results_uri: str, top: int = 10) -> dict[int, bytes]:
    """PNG overlays for the ``top`` images by invalid activation ratio, by ``row`` (what ``html`` embeds).

    An image that cannot be read any more is left out: the report still renders."""
    from .. import results as res
    from .. import storage
    from ..data import MaskSpec, decode_mask, model_view
    from ..modelspec import InputSpec

    pf = res.open_file(results_uri)
    table = pf.read(columns=[c for c in _OVERLAY_COLUMNS if c in pf.schema_arrow.names])
    md = res.run_metadata(pf.schema_arrow)
    spec = InputSpec.from_card(md.get("model", {}).get("input"))
    mask_spec = MaskSpec.from_dict(md.get("mask_spec"))
    rows = {r.get("row", i): r for i, r in enumerate(table.to_pylist())}
    out: dict[int, bytes] = {}
    for key, _cells in _top_and_errors(table, top)[0]:
        row = rows[key]
        try:
            size = (row["image_width"], row["image_height"])
            mask = None
            if row.get("mask"):
                mask = model_view(decode_mask(storage.read_bytes(row["mask"]), row["mask"], mask_spec, size),
                                  spec, size)
            out[key] = overlay_png(storage.read_bytes(row["image"]), res.cam_array(row), spec.box(*size), mask)
        except (storage.StorageError, ValueError, TypeError):
            continue  # the image moved or the row has no map: the report goes without this picture
    return out
