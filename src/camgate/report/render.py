"""Human-readable views of a gate decision: Markdown and self-contained HTML.

Both are built from one list of sections (:func:`camgate.report.page.build_page`), so they say the
same; the HTML adds the figures and the gallery of overlays. Every piece of text that comes from data (image ids, class
names, errors, scope values, URIs, the policy name) is escaped: a results file is input, and a
report is opened in a browser. The Markdown holds no HTML at all (KFP's viewer disables it).

Tables are capped (failing rows kept first) and the gallery holds :data:`GALLERY` small pictures,
so a run of any size gives an HTML page under 10 MB and Markdown under 400,000 characters; every
rule is in ``record.json`` and ``junit.xml`` whatever the page leaves out.
"""
from __future__ import annotations

import base64
import html as _html

import numpy as np

from ..gating.decision import Decision
from .overlays import GALLERY, colours
from .page import Figure, Gallery, Sub, Table, build_page

# --------------------------------------------------------------------------- markdown


def _md(text) -> str:
    # Entities first (renderers may pass raw HTML through), then code/link/table syntax; emphasis
    # characters stay readable since they cannot inject anything.
    s = _html.escape(str(text), quote=False)
    for ch in "\\`[]|":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in t.head) + " |", "|" + "---|" * len(t.head)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in t.rows]
    return lines + [""] + ([_md(t.more), ""] if t.more else [])


def markdown(decision: Decision, results=None, title: str | None = None, top: int = GALLERY,
             context: dict | None = None) -> str:
    """Markdown summary (KFP Output[Markdown]), no HTML in it; ``results`` (table or Parquet path/URI)
    adds the distribution, per-class table, the top-``top`` images by ratio and the error rows;
    ``context`` (from :func:`camgate.report.artifacts`) the model, champion, evidence and record."""
    p = build_page(decision, results, title, top, context, "md")
    out = [f"# {_md(p.title)}", "", f"**{_md(p.verdict)}**", ""]
    if p.trust:
        out += [f"**{_md(p.trust)}**", ""]
    out += [f"- Warning: {_md(n)}" for n in p.notes] + ([""] if p.notes else [])
    for heading, parts in p.sections:
        out += [f"## {_md(heading)}", ""]
        for part in parts:
            if isinstance(part, Table):
                out += _md_table(part)
            elif isinstance(part, Sub):
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


def _html_table(t: Table, cls: str = "", err_column: int | None = None) -> str:
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
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in (np.round(colours(np.linspace(0, 1, 9)) * 255).astype(int)))
    return f'<span class="ramp" style="background:linear-gradient(to right, {stops})"></span>'


def _html_gallery(g: Gallery) -> str:
    legend = (f'<div class="legend"><span>Each picture: left, the image as the model saw it; right, the heatmap '
              f'over it.</span><span><span class="outline"></span> invalid pixels (the mask): outlined, tinted on '
              f'the left</span><span>heatmap, scaled to each image\'s maximum: 0 {_ramp()} 1</span>'
              + ('<span>white rectangle: the box of the detection explained, with its class and score</span>'
                 if g.boxes else '') + '</div>')
    cards = []
    for image, lines in g.items:
        pic = (f'<img class="overlay" alt="{_e(lines[0])}" src="{_data_uri(image)}">' if image
               else "<p>(picture not available: the image could not be read)</p>")
        cards.append(f"<figure>{pic}<figcaption>{'<br>'.join(_e(s) for s in lines)}</figcaption></figure>")
    return legend + '<div class="gallery">' + "".join(cards) + "</div>"


def html(decision: Decision, results=None, title: str | None = None, top: int = GALLERY,
         images: dict[int, bytes] | None = None, context: dict | None = None) -> str:
    """Self-contained HTML page (inline CSS, images as data: URIs, no script). ``images`` maps a
    result's ``row`` (in a detection run ``(row, det_index)``) to the picture of its overlay
    (:func:`overlays`), shown for the top images."""
    p = build_page(decision, results, title, top, context, "html", images)
    state = "pass" if decision.passed else "fail"
    body = [f"<h1>{_e(p.title)}</h1>", f'<p class="verdict">{_e(p.verdict)}</p>']
    if p.trust:
        body.append(f'<p class="{"trusted" if p.trusted else "untrusted"}">{_e(p.trust)}</p>')
    body += [f'<p class="warning">Warning: {_e(n)}</p>' for n in p.notes]
    for heading, parts in p.sections:
        body.append(f"<h2>{_e(heading)}</h2>")
        for part in parts:
            if isinstance(part, Table):
                body.append(_html_table(part, "ident" if heading == "Model and data" else "",
                                        1 if heading == "Errors" else None))
            elif isinstance(part, Figure):
                body.append(f'<figure><img class="plot" alt="{_e(part.alt)}" src="{_data_uri(part.image)}">'
                            f"<figcaption>{_e(part.caption)}</figcaption></figure>")
            elif isinstance(part, Gallery):
                body.append(_html_gallery(part))
            elif isinstance(part, Sub):
                body.append(f"<h3>{_e(part.text)}</h3>")
            else:
                body.append(f"<p>{_e(part)}</p>")
    body += [f'<p class="record">{_e(f)}</p>' for f in p.footer]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(p.title)}</title><style>{_CSS}</style></head>"
            f'<body class="{state}">\n' + "\n".join(body) + "\n</body></html>\n")
