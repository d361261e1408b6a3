"""The test record names the data by what it can prove: the manifest's sha256 only where there is a
manifest file, the data fingerprint always, and a requirements text that claims no hash it lacks."""
import hashlib
import json

import pytest
from helpers import make_set, tiny_card, write_policy

from camgate.cli import main
from camgate.io import results as res
from camgate.runner.shards import merge, plan


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recdata")
    _, manifest = make_set(root / "set", n=4)
    card = str(tiny_card(root / "model"))
    policy = write_policy(root / "p.yaml", {"mean_invalid_activation_ratio": {"max": 1.0}})
    return {"root": root, "manifest": manifest, "card": card, "policy": policy}


def record(setup, results) -> dict:
    out = setup["root"] / "record.json"
    assert main(["gate", results, "--policy", setup["policy"], "--record", str(out)]) == 0
    return json.loads(out.read_text())


def privacy(rec) -> str:
    return next(q["shows"] for q in rec["requirements"] if q["key"] == "privacy")


def test_a_manifest_run_names_the_manifest_and_the_fingerprint(setup, tmp_path):
    out = str(tmp_path / "r.parquet")
    assert main(["run", "--model", setup["card"], "--data", setup["manifest"], "--out", out, "--quiet"]) == 0
    rec = record(setup, out)
    assert rec["data"]["manifest_sha256"] == sha(setup["manifest"])
    assert rec["data"]["fingerprint"] == res.run_metadata(out)["identity"]["data"]["fingerprint"]
    assert rec["identity"]["weights_sha256"] == rec["model"]["weights_sha256"]
    assert "manifest's URI and sha256" in privacy(rec) and "fingerprint" in privacy(rec)


def test_a_prefix_run_claims_no_manifest_hash(setup, tmp_path):
    out = str(tmp_path / "r.parquet")
    prefix = str(setup["root"] / "set")
    assert main(["run", "--model", setup["card"], "--data", prefix, "--out", out, "--quiet"]) == 0
    rec = record(setup, out)
    # was: "manifest_sha256": null beside "named by URI and sha256"
    assert "manifest_sha256" not in rec["data"] and len(rec["data"]["fingerprint"]) == 64
    assert rec["data"]["fingerprint_images"] == 4
    text = privacy(rec)
    assert "sha256 in the record" not in text and "manifest's URI and sha256" not in text
    assert "fingerprint" in text and "no manifest file" in text


def test_parts_merged_without_the_manifest_are_named_by_fingerprint(setup, tmp_path):
    whole = str(tmp_path / "whole.parquet")
    assert main(["run", "--model", setup["card"], "--data", setup["manifest"], "--out", whole, "--quiet"]) == 0
    parts = []
    for k, shard in enumerate(plan(setup["manifest"], 2, str(tmp_path / "shards"))):
        parts.append(str(tmp_path / f"p{k}.parquet"))
        assert main(["run", "--model", setup["card"], "--data", shard, "--out", parts[-1], "--quiet"]) == 0
    merged = str(tmp_path / "merged.parquet")
    merge(parts, merged)
    rec = record(setup, merged)
    assert rec["data"]["manifest"] is None and "manifest_sha256" not in rec["data"]
    assert rec["data"]["fingerprint"] == record(setup, whole)["data"]["fingerprint"]
    assert "manifest's URI and sha256" not in privacy(rec)
