"""``camgate run`` / ``analyze`` / ``gate`` end to end, locally and on the real S3 server."""
import json
import math
import subprocess

import numpy as np
import pyarrow.parquet as pq
import yaml
from helpers import CAMGATE, make_set, png
from PIL import Image

from camgate.cli import main
from camgate.io import results, storage
from camgate.runner.analysis import analyze
from camgate.runner.heatmaps import run


def test_run_local_rows_in_order_with_errors(tmp_path):
    card, manifest = make_set(tmp_path, n=10, bad=["images/nope.png,masks/000.png,1,cam0",
                                                   "images/000.png,masks/000.png,7,cam0"])
    out = tmp_path / "r.parquet"
    s = run(card, manifest, str(out), target="label", batch_size=4, progress=False)
    t = pq.read_table(out)
    # explaining a non-predicted class of a random net often gives an all-zero map: no_activation
    assert t.num_rows == s.rows == 12 and s.counts["error"] == 2
    assert s.counts["ok"] + s.counts["no_activation"] == 10 and s.counts["ok"] > 0
    assert t.column("image_id").to_pylist() == [f"{i:03d}" for i in range(10)] + ["nope", "000"]
    rows = t.to_pylist()
    assert "nope.png" in rows[10]["error"] and "not found" in rows[10]["error"]
    assert "label 7" in rows[11]["error"]
    for r in rows[:10]:
        assert r["target_class"] == int(r["label"])
        if r["status"] == "no_activation":
            assert math.isnan(r["invalid_activation_ratio"]) and r["cam"] is not None
    ok = next(r for r in rows if r["status"] == "ok")
    assert ok["camera"] in ("cam0", "cam1") and ok["camera"] == "cam0" and ok["predicted_label"] in ("a", "b", "c")
    assert (ok["cam_height"], ok["cam_width"]) == (4, 4)
    assert results.cam_array(ok).shape == (4, 4)
    assert 0 <= ok["invalid_activation_ratio"] <= 1
    md = results.run_metadata(t)
    assert md["method"] == "gradcam" and md["model_card_sha256"] and md["camgate_version"]


def test_split_heatmaps_then_analyze_equals_fused(tmp_path):
    card, manifest = make_set(tmp_path, n=6)
    run(card, manifest, str(tmp_path / "fused.parquet"), progress=False)
    run(card, manifest, str(tmp_path / "h.parquet"), analyze=False, progress=False)
    h = pq.read_table(tmp_path / "h.parquet")
    assert h.column("invalid_activation_ratio").null_count == h.num_rows  # no masks read yet
    analyze(str(tmp_path / "h.parquet"), str(tmp_path / "r.parquet"), data=manifest, progress=False)
    a, b = pq.read_table(tmp_path / "fused.parquet"), pq.read_table(tmp_path / "r.parquet")
    assert a.column("status").to_pylist() == b.column("status").to_pylist()
    # analyze works from the float32 maps in the file: the same numbers (tests/test_trust.py: 1e-6)
    np.testing.assert_allclose(a.column("invalid_activation_ratio").to_numpy(),
                               b.column("invalid_activation_ratio").to_numpy(), atol=1e-6, rtol=0)


def test_analyze_reports_a_missing_mask_on_its_row(tmp_path):
    card, manifest = make_set(tmp_path, n=5)
    run(card, manifest, str(tmp_path / "h.parquet"), analyze=False, progress=False)
    (tmp_path / "masks" / "002.png").unlink()
    s = analyze(str(tmp_path / "h.parquet"), str(tmp_path / "r.parquet"), data=manifest, progress=False)
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert s.rows == 5 and s.counts["error"] == 1
    assert rows[2]["status"] == "error" and "002.png" in rows[2]["error"] and "not found" in rows[2]["error"]
    assert all(r["status"] != "error" for i, r in enumerate(rows) if i != 2)


def test_no_mask_source_at_all_is_a_usage_error_before_any_compute(tmp_path, capsys):
    """A newcomer's first try: a manifest without masks, no masks/, no static mask. Not an error on
    every row with exit 0, but exit 2 naming the three ways out, before anything is computed."""
    card, manifest = make_set(tmp_path, n=3)
    bare = tmp_path / "bare.csv"
    bare.write_text("image,label\n" + "".join(f"images/{i:03d}.png,0\n" for i in range(3)))
    out = tmp_path / "r.parquet"
    assert main(["run", "--model", card, "--data", str(bare), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("no mask", "mask column", "--static-mask", "--heatmaps-only")), err
    assert not out.exists() and not (tmp_path / "r.parquet.parts").exists()
    # the three ways out work
    assert main(["run", "--model", card, "--data", str(bare), "--out", str(out), "--heatmaps-only", "--quiet"]) == 0
    assert main(["analyze", str(out), "--out", str(tmp_path / "a.parquet"), "--quiet"]) == 2  # still no mask
    assert "no mask" in capsys.readouterr().err
    assert main(["analyze", str(out), "--out", str(tmp_path / "a.parquet"), "--data", manifest, "--quiet"]) == 0
    assert main(["run", "--model", card, "--data", str(bare), "--out", str(tmp_path / "s.parquet"),
                 "--static-mask", str(tmp_path / "masks" / "000.png"), "--quiet"]) == 0
    assert {r["status"] for r in pq.read_table(tmp_path / "s.parquet").to_pylist()} == {"ok"}


def test_report_overlays_show_the_top_images(tmp_path):
    import io

    from camgate import report

    card, manifest = make_set(tmp_path, n=6)
    out = str(tmp_path / "r.parquet")
    run(card, manifest, out, progress=False)
    (tmp_path / "images" / "005.png").unlink()  # a vanished image: no picture, no crash
    pics = report.overlays(out, top=4)
    ok = [r for r in pq.read_table(out).to_pylist() if r["status"] == "ok"]
    top = sorted(ok, key=lambda r: -r["invalid_activation_ratio"])[:4]
    assert set(pics) == {r["row"] for r in top} - {5} and pics
    im = Image.open(io.BytesIO(next(iter(pics.values()))))
    # two panels side by side (image with mask, heatmap), each fitted into 160 x 160, 256 colours
    assert 2 * 150 < im.size[0] <= 2 * 160 + 8 and im.size[1] <= 160 and im.mode == "P"


def test_nan_model_gives_error_rows_only_where_it_fails(tmp_path):
    card, manifest = make_set(tmp_path, n=4)
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump({"name": "n", "arch": "zoo:nan_net", "num_classes": 3,
                                                       "input": {"size": [32, 32], "mean": [0.5] * 3,
                                                                 "std": [0.5] * 3}}))
    img = np.zeros((32, 32, 3), np.uint8)  # black -> mean -1 after normalisation -> NaN
    (tmp_path / "images" / "black.png").write_bytes(png(img))
    with open(tmp_path / "manifest.csv", "a") as f:
        f.write("images/black.png,masks/000.png,0,cam0\n")
    t = pq.read_table(run(str(tmp_path / "nan.yaml"), manifest, str(tmp_path / "r.parquet"), progress=False).out)
    st = t.column("status").to_pylist()
    assert st[-1] == "error" and "NaN" in t.column("error").to_pylist()[-1]
    assert st[:-1].count("error") == 0


def test_model_raising_on_one_image_fails_only_that_row(tmp_path):
    card, manifest = make_set(tmp_path, n=5)
    (tmp_path / "picky.yaml").write_text(yaml.safe_dump({"name": "p", "arch": "zoo:picky_net", "num_classes": 3,
                                                         "input": {"size": [32, 32], "mean": [0.5] * 3,
                                                                   "std": [0.5] * 3}}))
    (tmp_path / "images" / "white.png").write_bytes(png(np.full((32, 32, 3), 255, np.uint8)))
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    lines.insert(3, "images/white.png,masks/000.png,0,cam0")  # in the middle of the first batch
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    t = pq.read_table(run(str(tmp_path / "picky.yaml"), manifest, str(tmp_path / "r.parquet"), batch_size=4,
                          progress=False).out)
    st, err = t.column("status").to_pylist(), t.column("error").to_pylist()
    assert st[2] == "error" and "white.png" in err[2] and "cannot handle bright images" in err[2]
    assert st.count("error") == 1 and t.num_rows == 6


def test_cli_exit_codes(tmp_path, capsys):
    card, manifest = make_set(tmp_path, n=6)
    out = str(tmp_path / "r.parquet")
    assert main(["run", "--model", card, "--data", manifest, "--out", out, "--quiet"]) == 0
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"rules": {"mean_invalid_activation_ratio": {"max": 0.0}}}))
    loose = tmp_path / "loose.yaml"
    loose.write_text(yaml.safe_dump({"rules": {"mean_invalid_activation_ratio": {"max": 1.0}}}))
    capsys.readouterr()
    assert main(["gate", out, "--policy", str(loose), "--fail-on-violation"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert main(["gate", out, "--policy", str(strict)]) == 0  # soft fail: reported, exit 0
    assert json.loads(capsys.readouterr().out)["passed"] is False
    assert main(["gate", out, "--policy", str(strict), "--fail-on-violation"]) == 1
    assert main(["gate", out, "--policy", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", "--model", card, "--data", manifest, "--out", out, "--method", "nocam"]) == 2
    assert "unknown CAM method" in capsys.readouterr().err
    assert main(["run", "--model", card, "--data", manifest, "--out", out, "--target-layer", "layer9"]) == 2
    assert "candidates" in capsys.readouterr().err


def test_run_20_images_all_on_s3(s3_bucket, tmp_path):
    """Images, masks, manifest, model card and output all on the SeaweedFS server, via the real CLI."""
    card, manifest = make_set(tmp_path, n=20, prefix=storage.join(s3_bucket, "set"))
    out = storage.join(s3_bucket, "out", "results.parquet")
    p = subprocess.run(CAMGATE + ["run", "--model", card, "--data", manifest, "--out", out, "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["counts"]["ok"] == 20
    t = results.read_table(out)
    assert t.num_rows == 20 and set(t.column("status").to_pylist()) == {"ok"}
    assert t.column("image").to_pylist()[0] == storage.join(s3_bucket, "set", "images", "000.png")


def test_wrong_credentials_fail_fast(s3_bucket, tmp_path, monkeypatch):
    card, manifest = make_set(tmp_path, n=2, prefix=storage.join(s3_bucket, "c"))
    secret = "wrong-secret-value-123"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    p = subprocess.run(CAMGATE + ["run", "--model", card, "--data", manifest, "--out", str(tmp_path / "r.parquet")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "access denied" in p.stderr.lower() and secret not in p.stderr + p.stdout
