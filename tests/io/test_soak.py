"""Soak: 5,000 small images from the real S3 server; every row arrives and memory stays flat
(peak RSS grows by at most 5 MB per 1,000 images, i.e. 5 KB per image: rows are streamed out)."""
import io
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
from helpers import CAMGATE, HERE
from PIL import Image

from camgate.io import results, storage

N = 5000


def _png(i):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_soak_5000_images_from_s3_constant_memory(s3_bucket, tmp_path):
    base = storage.join(s3_bucket, "soak")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: storage.write_bytes(storage.join(base, f"images/{i:05d}.png"), _png(i)), range(N)))
    mask = io.BytesIO()
    Image.fromarray((np.arange(24)[:, None] < 8).repeat(32, 1).astype(np.uint8) * 255).save(mask, "PNG")
    storage.write_bytes(storage.join(base, "wall.png"), mask.getvalue())
    for n in (500, N):
        rows = "".join(f"images/{i:05d}.png,{i % 7}\n" for i in range(n))
        storage.write_bytes(storage.join(base, f"m{n}.csv"), ("image,shift\n" + rows).encode())
    storage.write_bytes(storage.join(base, "card.yaml"), yaml.safe_dump(
        {"name": "tiny", "arch": "zoo:tiny_cnn", "num_classes": 3, "input": {"size": [32, 32]}}).encode())
    env = dict(os.environ, PYTHONPATH=HERE)
    summaries = {}
    for n in (500, N):
        out = storage.join(base, f"out{n}.parquet")
        p = subprocess.run(CAMGATE + ["run", "--model", storage.join(base, "card.yaml"), "--data",
                                      storage.join(base, f"m{n}.csv"), "--static-mask", storage.join(base, "wall.png"),
                                      "--out", out, "--batch-size", "64", "--workers", "8", "--quiet"],
                           capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        summaries[n] = json.loads(p.stdout)
        t = results.read_table(out, columns=["image_id", "status", "shift"])
        assert t.num_rows == n and t.column("status").to_pylist().count("error") == 0
        assert t.column("image_id").to_pylist() == [f"{i:05d}" for i in range(n)]
    # a slope, not a ratio: against a baseline of ~650 MB a ratio of 1.2 would let 26 KB per image leak
    slope = (summaries[N]["peak_rss_mb"] - summaries[500]["peak_rss_mb"]) / ((N - 500) / 1000)
    print(f"soak: peak RSS {summaries[500]['peak_rss_mb']} MB over 500, {summaries[N]['peak_rss_mb']} MB over {N}"
          f" ({slope:.2f} MB per 1,000 images); {summaries[N]['seconds']} s for {N} images")
    assert slope <= 5.0, f"memory grows by {slope:.1f} MB per 1,000 images"
