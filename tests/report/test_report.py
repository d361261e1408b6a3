import base64
import json
import math

import numpy as np
import pyarrow as pa
import yaml
from helpers import chromium

from camgate import report
from camgate.gating.decision import evaluate

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
    # the one overlay given, in the gallery; the other pictures are the report's own plots
    assert base64.b64encode(png).decode() in page and page.count('<img class="overlay"') == 1


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


# --------------------------------------------------------------------------- size, whatever the run


def big_results(n, seed):
    """A run of ``n`` images over 400 classes, 300 cameras and 40 sites, some errors with long messages."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 400, n)
    status = np.where(rng.random(n) < 0.01, "error", "ok")
    ok = status == "ok"
    ratio = np.where(ok, rng.beta(2, 5, n), np.nan)
    return pa.table({
        "row": pa.array(np.arange(n), pa.int64()),
        "image_id": [f"img{i:06d}<x>" for i in range(n)],
        "image": [f"/d/{i}.png" for i in range(n)],
        "status": status,
        "error": [None if s == "ok" else "Traceback | <pre>" + "y" * 2000 for s in status],
        "label": [str(c) for c in cls],
        "predicted_class": pa.array([int(c) if o else None for c, o in zip(cls, ok)], pa.int32()),
        "predicted_label": [f"class <{c}>" if o else None for c, o in zip(cls, ok)],
        "invalid_activation_ratio": ratio,
        "invalid_area_ratio": np.where(ok, rng.beta(2, 6, n), np.nan),
        "peak_in_invalid": pa.array([bool(r > 0.5) if o else None for r, o in zip(ratio, ok)], pa.bool_()),
        "camera": [f"cam|{i}" for i in rng.integers(0, 300, n)],
        "site": [f"site {i}" for i in rng.integers(0, 40, n)],
    })


def test_the_report_of_a_large_run_stays_small():
    """50,000 images, 740 scopes, ~2,900 rules, a champion and ROAD: HTML ≤ 10 MB with a full gallery of
    worst-case pictures (noise does not compress), Markdown < 400,000 characters and free of HTML."""
    import re

    from helpers import png as png_bytes

    from camgate.report import GALLERY, overlay_png

    n = 50_000
    t, base = big_results(n, 0), big_results(n, 1)
    policy = {"name": "big", "per_class": True, "slices": ["camera", "site"], "rules": {
        "mean_invalid_activation_ratio": 0.29, "share_images_over": {"ratio": 0.5, "max": 0.1},
        "peak_in_invalid_rate": 0.2, "error_rate": 0.02, "faithfulness": {"min_margin": 0.05},
        "baseline_mean_increase": 0.01}}
    road = pa.table({"road": [0.3, 0.4], "road_random": [0.3, 0.38]})
    decision, files = report.artifacts(t, policy, road=road, baseline=base, images=False)
    assert len(decision.scopes) == 740 and len(decision.rules) > 2500 and decision.failed
    rng = np.random.default_rng(2)
    noise = png_bytes(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8))
    pic = overlay_png(noise, rng.random((14, 14), dtype=np.float32), (0, 0, 400, 400), rng.random((400, 400)) > 0.5)
    ctx = {"record": json.loads(files["record.json"]), "record_sha256": "0" * 64, "baseline": base, "road": None}
    page = report.html(decision, t, images={i: pic for i in range(n)}, context=ctx).encode()
    assert page.count(b'<img class="overlay"') == GALLERY
    assert len(page) <= 10 * 2**20, len(page)
    for md in (files["summary.md"].decode(), report.markdown(decision, t, context=ctx)):
        assert len(md) < 400_000, len(md)
        assert not re.search(r"<[A-Za-z/!]", md)
        assert "Heatmaps NOT trusted" in md and "## Per slice: camera" in md and "### Images that got worse most" in md
        assert re.search(r"\.\.\. and \d+ more rules", md) and re.search(r"\.\.\. and \d+ more scopes", md)
    assert b"Heatmaps NOT trusted" in files["report.html"] and len(files["report.html"]) <= 10 * 2**20


def test_failing_scopes_are_marked_and_listed_first_when_capped():
    t = big_results(3000, 0)
    d = evaluate(t, {"slices": ["camera"], "rules": {"mean_invalid_activation_ratio": 0.35}})
    failing = {s["scope"].split("=", 1)[1] for s in d.scopes
               if any(r.scope == s["scope"] and r.verdict == "fail" for r in d.rules)}
    assert 0 < len(failing) < 300
    md = report.markdown(d, t).split("## Per slice: camera")[1].split("\n## ")[0]
    lines = [line for line in md.splitlines() if line.startswith("| cam\\|")]
    assert len(lines) == report.page.MAX_ROWS["md"]
    marked = {line.split(" | ")[0][2:].replace("\\|", "|") for line in lines if "✗ FAIL: mean_invalid" in line}
    assert marked == failing or (len(failing) > len(lines) and marked <= failing)
    page = report.html(d, t)
    assert page.count('<tr class="v-fail"><td>cam|') == len(failing)


# --------------------------------------------------------------------------- in a browser


def test_the_report_of_a_real_run_renders_in_a_browser(real_run, tmp_path):
    """A real model's report with a champion, per class and per camera: Chromium draws it, every section
    is in the rendered DOM, and every picture is an embedded image that decodes."""
    import io
    from html.parser import HTMLParser

    from PIL import Image

    from camgate.cli import main

    r = real_run
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"name": "review", "per_class": True, "slices": ["camera"], "rules": {
        "mean_invalid_activation_ratio": {"max": 0.3}, "baseline_mean_increase": {"max": 0.02},
        "baseline_share_worse": {"by": 0.05, "max": 0.2}}}))
    page, md, rec = tmp_path / "report.html", tmp_path / "summary.md", tmp_path / "record.json"
    main(["gate", r["results"], "--policy", str(policy), "--baseline", r["baseline"], "--report", str(page),
          "--markdown", str(md), "--record", str(rec)])
    shot = tmp_path / "shot.png"
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    chromium(profile, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri())
    dom = chromium(profile, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (4000, 1280) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.headings, self.srcs, self._in = [], [], None

        def handle_starttag(self, tag, attrs):
            self._in = tag if tag in ("h1", "h2", "h3") else None
            if tag == "img":
                self.srcs.append(dict(attrs).get("src", ""))

        def handle_data(self, data):
            if self._in:
                self.headings.append(data.strip())
                self._in = None

    p = Parse()
    p.feed(dom)
    for h in ("Model and data", "Counts", "Overall", "Rules", "Invalid activation ratio vs invalid area",
              "Per class", "Per slice: camera", "Champion vs challenger", "Images that got worse most",
              "Top 10 images by invalid activation ratio", "Evidence: the EU's seven requirements for trustworthy AI"):
        assert h in p.headings, (h, p.headings)
    assert len(p.srcs) == 2 + 10  # two plots, the ten images of the run
    for src in p.srcs:
        head, _, data = src.partition(";base64,")
        assert head in ("data:image/png", "data:image/jpeg")
        Image.open(io.BytesIO(base64.b64decode(data, validate=True))).load()
    assert page.stat().st_size <= 10 * 2**20
    # the model's identity and every rule, passed ones too, as the record has them
    record = json.loads(rec.read_text())
    for key in ("card_sha256", "weights_sha256"):
        assert record["model"][key] in dom
    for value in (record["data"]["manifest_sha256"], record["policy"]["sha256"], "map resolution", "8 × 8"):
        assert value in dom
    rules = md.read_text().split("## Rules")[1].split("\n## ")[0]
    assert rules.count("\n| ") - 1 == len(record["rules"])
    assert {q["verdict"] for q in record["rules"]} == {"pass", "fail"}
    # each gallery card names the prediction and the label
    assert dom.count("predicted: ") == dom.count("label: ") == 10


def test_an_overlay_shows_the_model_view_and_the_heatmap_with_the_mask_outlined():
    import io

    from helpers import png as png_bytes
    from PIL import Image

    from camgate.report import overlay_png

    grey = png_bytes(np.full((50, 100, 3), 128, np.uint8))
    mask = np.zeros((50, 100), bool)
    mask[:, :50] = True  # the left half is invalid
    cam = np.zeros((4, 4), np.float32)
    cam[:, 3] = 1.0  # heat on the right
    pic = Image.open(io.BytesIO(overlay_png(grey, cam, (0, 0, 100, 50), mask)))
    assert pic.format == "PNG" and pic.mode == "P"  # 256 colours: small
    a = np.asarray(pic.convert("RGB")).astype(int)
    assert a.shape == (80, 2 * 160 + 4, 3)  # two panels fitted into 160 x 160
    view, heat = a[:, :160], a[:, 164:]
    assert view[40, 20, 0] > view[40, 20, 1] + 40 and abs(view[40, 120] - 128).max() <= 3  # invalid side tinted
    assert (view[40, 79] >= 250).all() and (view[40, 80] <= 5).all()  # white inside the border, black outside
    assert heat[40, 150, 0] > heat[40, 150, 2] and heat[40, 100, 2] > heat[40, 100, 0]  # red where the heat is
