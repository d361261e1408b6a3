import base64
import json
import math

import pyarrow as pa

from camgate import report
from camgate.gate import evaluate

NAN = float("nan")
EVIL = "<script>alert(1)</script>"


def results():
    ids = [EVIL, "b|c", "img2", "img3", "e1", "e2", "e3"]
    status = ["ok", "ok", "ok", "no_activation", "error", "error", "error"]
    return pa.table({
        "image_id": ids,
        "status": status,
        "error": [None] * 4 + ["CUDA <oom>", "bad png", "x" * 1000],
        "label": [None] * 7,
        "predicted_class": pa.array([0, 1, 1, 1, None, None, None], pa.int64()),
        "predicted_label": ["<b>cat</b>", "dog", "dog", "dog", None, None, None],
        "invalid_activation_ratio": [0.9, 0.2, 0.5, NAN, NAN, NAN, NAN],
        "invalid_area_ratio": [0.3] * 7,
        "peak_in_invalid": [True, False, False, None, None, None, None],
    })


POLICY = {"name": "p<1>", "rules": {"mean_invalid_activation_ratio": 0.4, "peak_in_invalid_rate": 0.5},
          "per_class": True}


def test_markdown_has_rule_table_and_escapes():
    t = results()
    d = evaluate(t, POLICY)
    md = report.markdown(d, t, top=2)
    assert md.splitlines()[2].startswith("**FAIL")
    assert "| rule | scope | value | threshold | n | verdict |" in md
    assert "| mean_invalid_activation_ratio | all | 0.533 | ≤ 0.400 | 3 | fail |" in md
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "<b>" not in md and "&lt;b&gt;cat" in md
    assert "| b\\|c |" in report.markdown(d, t, top=3)  # a pipe cannot break the table
    assert "... and 1 more" in md  # 3 errors, top=2
    assert "| dog | 3 | 2 | 0.350 |" in md  # per-class: rows, ok, mean ratio
    top = md.split("## Top 2")[1].split("##")[0]
    assert top.index("&lt;script") < top.index("img2")  # sorted by ratio, cut at 2
    assert "b\\|c" not in top


def test_markdown_without_results():
    d = evaluate(results(), POLICY)
    md = report.markdown(d, title="Gate")
    assert md.startswith("# Gate") and "## Rules" in md and "## Top" not in md


def test_html_self_contained_escaped_with_images():
    t = results()
    d = evaluate(t, POLICY)
    png = b"\x89PNG\r\n\x1a\nfake"
    page = report.html(d, t, top=3, images={0: png})  # keyed by row (here: position, EVIL's)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert "CUDA &lt;oom&gt;" in page
    assert "<th>threshold</th>" in page and 'class="v-fail"' in page
    assert base64.b64encode(png).decode() in page and page.count("<img") == 1


def test_metrics_flat_finite():
    t = results()
    d = evaluate(t, POLICY)
    m = report.metrics(d)
    assert m["passed"] == 0.0 and m["n_images"] == 7 and m["n_ok"] == 3 and m["error_rate"] == 3 / 7
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    empty = evaluate(results().filter(pa.array([False, False, False, True, True, True, True])), {})
    me = report.metrics(empty)
    assert "mean_invalid_activation_ratio" not in me and me["n_ok"] == 0.0
    json.dumps(me, allow_nan=False)
