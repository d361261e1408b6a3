"""Helpers shared by the tests: small data sets, model cards, pipeline arguments and process counters."""
import csv
import os
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from camgate.io import storage

HERE = os.path.dirname(os.path.abspath(__file__))  # tests/: zoo.py, imported by child processes


CAMGATE = [sys.executable, "-m", "camgate.cli"]


def make_set(root, n=20, prefix=None, bad=()):
    """n small images + per-image masks + manifest (+ a model card); files local or under an s3 prefix."""
    rng = np.random.default_rng(0)
    put = (lambda rel, b: storage.write_bytes(storage.join(prefix, rel), b)) if prefix else \
          (lambda rel, b: (root / rel).parent.mkdir(parents=True, exist_ok=True) or (root / rel).write_bytes(b))
    lines = ["image,mask,label,camera"]
    for i in range(n):
        img = rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        mask[: 4 + i % 8] = 255
        put(f"images/{i:03d}.png", png(img))
        put(f"masks/{i:03d}.png", png(mask))
        lines.append(f"images/{i:03d}.png,masks/{i:03d}.png,{i % 3},cam{i % 2}")
    lines += list(bad)
    put("manifest.csv", ("\n".join(lines) + "\n").encode())
    put("card.yaml", yaml.safe_dump({"name": "t", "arch": "torchvision/resnet18", "num_classes": 3,
                                     "classes": ["a", "b", "c"], "input": {"size": [64, 64]},
                                     "target_layer": "layer3"}).encode())
    base = prefix or str(root)
    return storage.join(base, "card.yaml"), storage.join(base, "manifest.csv")


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root``, by its relative path: two trees compare byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def png(a):
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def counting_env(tmp_path, name):
    """The zoo's counting model appends the images of each forward to this file."""
    count = tmp_path / name
    return count, dict(os.environ, PYTHONPATH=HERE, CAMGATE_TEST_COUNT=str(count))


def computed(count) -> int:
    return sum(int(line.split()[0]) for line in count.read_text().splitlines()) if count.exists() else 0


def processes(count) -> set[str]:
    """The processes that computed images."""
    return {line.split()[1] for line in count.read_text().splitlines()} if count.exists() else set()


def zoo_card(folder, factory, size=32, **extra):
    path = folder / f"{factory}.yaml"
    path.write_text(yaml.safe_dump({"name": factory, "arch": f"zoo:{factory}", "num_classes": 3,
                                    "input": {"size": [size, size]}, **extra}))
    return str(path)


def tiny_card(folder: Path, name="card.yaml", **extra) -> Path:
    """A zoo:tiny_cnn card next to safetensors weights referenced by a relative path."""
    from safetensors.torch import save
    from zoo import tiny_cnn

    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "models" / "w.safetensors").write_bytes(save(tiny_cnn().state_dict()))
    card = {"name": "tiny", "arch": "zoo:tiny_cnn", "num_classes": 3, "classes": ["a", "b", "c"],
            "weights": "models/w.safetensors", "input": {"size": [32, 32]}, **extra}
    (folder / name).write_text(yaml.safe_dump(card))
    return folder / name


ROOT = Path(__file__).resolve().parents[1]


COMPILED = str(ROOT / "pipelines" / "heatmap_gate.yaml")


EXPORTS = ["decision.json", "junit.xml", "record.json", "report.html", "results.parquet", "summary.md"]


def args(s, policy: str, out: str, **extra) -> dict:
    return {"model_card": s["card"], "data": s["data"], "policy": s["policies"][policy],
            "output_prefix": storage.join(s["bucket"], out), "batch_size": 4, **extra}


def exported(s, out: str) -> list[str]:
    """The files directly under the output prefix (shards/ holds the shards' manifests, parts and markers)."""
    prefix = storage.join(s["bucket"], out) + "/"
    return [u[len(prefix):] for u in storage.list_uris(prefix[:-1]) if "/" not in u[len(prefix):]]


def results_table(ratio, status=None, rows=None, images=None, md=None):
    """An in-memory results table (row, image, status, ratios) with ``md`` as its camgate metadata."""
    import pyarrow as pa

    from camgate.io import results as res

    n = len(ratio)
    rows = list(range(n)) if rows is None else rows
    t = pa.table({
        "row": pa.array(rows, pa.int64()),
        "image_id": [f"img{r}" for r in rows],
        "image": images or [f"/d/img{r}.png" for r in rows],
        "status": status or ["ok"] * n,
        "invalid_activation_ratio": pa.array(ratio, pa.float64()),
        "invalid_area_ratio": [0.25] * n,
        "peak_in_invalid": [False] * n,
        "predicted_class": pa.array([r % 2 for r in rows], pa.int64()),
    })
    return t.replace_schema_metadata(res.schema(None, md or {}).metadata)


def write_policy(path, rules: dict, name="p") -> str:
    """A policy YAML with these rules (the default no_activation_rate limit switched off)."""
    path.write_text(yaml.safe_dump({"name": name, "rules": {"no_activation_rate": None, **rules}}))
    return str(path)


def chromium(*args, timeout=120):
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it): the report must be checked in a browser")
        pytest.skip("chromium not installed (apt-get install -y chromium): the report is not rendered in a browser")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout, check=True).stdout
