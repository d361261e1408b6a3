"""The bad-input corpus, generated here and served by the real S3 server, through ``camgate run``.

Every manifest row gets exactly one result row: broken items an ``error`` naming the item and the
problem, odd-but-valid items a normal result. The README's bad-input table lists the same cases.
"""
import io
import json
import struct
import subprocess
import zlib

import numpy as np
import pytest
import yaml
from helpers import CAMGATE
from PIL import Image

from camgate.io import results, storage


def enc(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w=48, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A tiny PNG whose header declares w x h pixels."""
    raw = enc(Image.new("L", (8, 8)))
    ihdr = struct.pack(">II", w, h) + raw[24:29]
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


MASK = Image.fromarray((np.arange(40)[:, None] < 12).repeat(48, 1).astype(np.uint8) * 255)

# name -> (image bytes or None for "not uploaded", mask bytes or None, expected status, words in error)
BROKEN = {
    "missing_image": (None, enc(MASK), "error", ["missing_image", "not found"]),
    "missing_mask": (enc(rgb()), None, "error", ["mask", "missing_mask", "not found"]),
    "zero_bytes": (b"", enc(MASK), "error", ["zero_bytes", "empty file"]),
    "truncated_jpeg": (enc(rgb(200, 160), "JPEG")[:900], enc(MASK), "error", ["truncated_jpeg", "truncated"]),
    "truncated_png": (enc(rgb(200, 160))[:2000], enc(MASK), "error", ["truncated_png", "truncated"]),
    "not_an_image": (b"%PDF-1.4 definitely not pixels" * 10, enc(MASK), "error",
                     ["not_an_image", "not a recognised image"]),
    "decompression_bomb": (bomb_png(), enc(MASK), "error", ["decompression_bomb", "decompression bomb"]),
}
WORKS = {
    "one_pixel": (enc(Image.new("RGB", (1, 1), (200, 10, 10))), enc(MASK)),
    "grayscale": (enc(rgb().convert("L")), enc(MASK)),
    "rgba": (enc(rgb().convert("RGBA")), enc(MASK)),
    "sixteen_bit": (enc(Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16))), enc(MASK)),
    "palette": (enc(rgb().convert("P")), enc(MASK)),
    "mask_other_size": (enc(rgb()), enc(MASK.resize((17, 90)))),
    "non_binary_mask": (enc(rgb()), enc(Image.fromarray((np.arange(40)[:, None] % 7).repeat(48, 1).astype(np.uint8)))),
    "all_invalid_mask": (enc(rgb()), enc(Image.new("L", (48, 40), 255))),
    "all_valid_mask": (enc(rgb()), enc(Image.new("L", (48, 40), 0))),
    "jpeg": (enc(rgb(), "JPEG"), enc(MASK)),
    "cmyk_jpeg": (enc(rgb().convert("CMYK"), "JPEG"), enc(MASK)),
}


@pytest.fixture(scope="module")
def corpus_run(s3_server, tmp_path_factory):
    bucket = storage.ensure_bucket("bad-inputs")
    base = storage.join(bucket, "set")
    lines = ["image,mask,label"]
    for name, (img, mask, *_rest) in list(BROKEN.items()) + [(k, (*v, "ok", [])) for k, v in WORKS.items()]:
        ext = "jpg" if "jpeg" in name else "png"
        if img is not None:
            storage.write_bytes(storage.join(base, f"images/{name}.{ext}"), img)
        if mask is not None:
            storage.write_bytes(storage.join(base, f"masks/{name}.png"), mask)
        lines.append(f"images/{name}.{ext},masks/{name}.png,0")
    lines += [
        "images/grayscale.png,masks/grayscale.png,1",  # duplicate row (other label): its own row
        "images/grayscale.png,masks/grayscale.png,1",
        "http://example.invalid/x.png,masks/grayscale.png,0",  # unsupported scheme
        "../../outside/x.png,masks/grayscale.png,0",  # escapes the manifest's folder
        "images/palette.png,masks/palette.png,9",  # label outside the model's classes
    ]
    storage.write_bytes(storage.join(base, "manifest.csv"), ("\n".join(lines) + "\n").encode())
    storage.write_bytes(storage.join(base, "card.yaml"), yaml.safe_dump(
        {"name": "t", "arch": "torchvision/resnet18", "num_classes": 3, "input": {"size": [64, 64]},
         "target_layer": "layer3"}).encode())
    out = storage.join(bucket, "out", "results.parquet")
    p = subprocess.run(CAMGATE + ["run", "--model", storage.join(base, "card.yaml"), "--data",
                                  storage.join(base, "manifest.csv"), "--out", out, "--target", "label", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    return p, out, len(lines) - 1


def test_every_row_is_accounted_for(corpus_run):
    p, out, n = corpus_run
    assert p.returncode == 0, p.stderr
    t = results.read_table(out)
    assert t.num_rows == n == json.loads(p.stdout)["rows"]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_item_gets_an_error_naming_it(corpus_run, name):
    rows = {r["image_id"]: r for r in results.read_table(corpus_run[1]).to_pylist()}
    row = rows[name]
    assert row["status"] == "error"
    for word in BROKEN[name][3]:
        assert word in row["error"], row["error"]


@pytest.mark.parametrize("name", list(WORKS))
def test_odd_but_valid_item_works(corpus_run, name):
    row = next(r for r in results.read_table(corpus_run[1]).to_pylist() if r["image_id"] == name)
    assert row["status"] in ("ok", "no_activation"), row["error"]
    assert row["error"] is None and row["cam"] is not None
    if name == "all_invalid_mask" and row["status"] == "ok":
        assert row["invalid_activation_ratio"] == pytest.approx(1) and row["invalid_area_ratio"] == 1
    if name == "all_valid_mask":
        assert row["invalid_area_ratio"] == 0 and row["peak_in_invalid"] in (False, None)


def test_rows_named_in_the_manifest_tail(corpus_run):
    rows = results.read_table(corpus_run[1]).to_pylist()[-5:]
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"] or all(r["status"] != "error" for r in rows[:2])
    assert rows[0]["label"] == rows[1]["label"] == "1"  # duplicates each keep their own row
    assert "unsupported URI scheme" in rows[2]["error"]
    assert "escapes" in rows[3]["error"]
    assert "label 9" in rows[4]["error"] and "outside" in rows[4]["error"]


def test_secret_appears_nowhere(corpus_run, s3_server):
    p, out, _ = corpus_run
    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    blob = storage.read_bytes(out)
    assert secret.encode() not in blob and secret not in p.stdout + p.stderr
    assert secret not in json.dumps(results.run_metadata(out))


def test_run_level_problems_fail_fast_with_exit_2(tmp_path):
    (tmp_path / "m.csv").write_text("picture,mask\nx.png,y.png\n")
    (tmp_path / "ok.csv").write_text("image,mask\nx.png,y.png\n")
    (tmp_path / "card.yaml").write_text(yaml.safe_dump({"name": "t", "arch": "torchvision/resnet18", "num_classes": 3}))
    cases = [
        (["--data", str(tmp_path / "m.csv")], "image"),                       # missing required column
        (["--data", str(tmp_path / "ok.csv"), "--method", "nope"], "unknown CAM method"),
        (["--data", str(tmp_path / "ok.csv"), "--target", "7"], "outside"),
    ]
    for extra, words in cases:
        p = subprocess.run(CAMGATE + ["run", "--model", str(tmp_path / "card.yaml"),
                                      "--out", str(tmp_path / "o.parquet")]
                           + extra, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    p = subprocess.run(CAMGATE + ["run", "--model", str(tmp_path / "bad.yaml"), "--data", str(tmp_path / "m.csv"),
                                  "--out", str(tmp_path / "o.parquet")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "model card" in p.stderr and "Traceback" not in p.stderr
