"""The compiled heatmap-gate pipeline under kfp.local's SubprocessRunner, against the real S3 server."""
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")

from helpers import COMPILED, EXPORTS, ROOT, args, exported

from camgate.io import storage  # noqa: E402
from camgate.kfp import PipelineFailed, local_run  # noqa: E402
from camgate.steps import GateFailed  # noqa: E402


@pytest.mark.kfp
def test_pass_promotes_and_exports(s3_set, s3_server, capfd):
    promoted_to = storage.join(s3_set["bucket"], "promoted")
    r = local_run(args(s3_set, "loose", "run-pass", promote_to=promoted_to), s3_set["root"], package_path=COMPILED)
    assert r["passed"] is True and r["promoted"] is True
    assert r["n_images"] == 6 and r["error_rate"] == 0.0 and 0 <= r["mean_invalid_activation_ratio"] <= 1
    assert "PASS" in Path(r["summary"]).read_text()
    assert Path(r["report"]).read_text().startswith("<!DOCTYPE html>")
    assert exported(s3_set, "run-pass") == EXPORTS
    decision = json.loads(storage.read_bytes(storage.join(s3_set["bucket"], "run-pass", "decision.json")))
    assert decision["passed"] is True and decision["counts"]["ok"] == 6
    logs = capfd.readouterr()
    # the promote task copied card, weights and the gate's own test record, marker last
    from camgate.promote import promoted

    [folder] = {u.rsplit("/", 1)[0] for u in storage.list_uris(storage.join(promoted_to, "tiny"))}
    marker = promoted(folder)
    assert marker is not None and sorted(marker["files"]) == ["card.json", "record.json", "w.safetensors"]
    record = storage.read_bytes(storage.join(folder, "record.json"))
    assert record == storage.read_bytes(storage.join(s3_set["bucket"], "run-pass", "record.json"))
    assert f"promoted model 'tiny' to {folder}" in logs.out
    assert s3_server.secret_key not in logs.out + logs.err  # credentials never reach the logs


@pytest.mark.kfp
def test_soft_fail_skips_promote_and_succeeds(s3_set):
    r = local_run(args(s3_set, "strict", "run-soft"), s3_set["root"], package_path=COMPILED, echo=False)
    assert r["passed"] is False and r["promoted"] is False and r["n_images"] == 6
    assert "FAIL" in Path(r["summary"]).read_text()
    decision = json.loads(storage.read_bytes(storage.join(s3_set["bucket"], "run-soft", "decision.json")))
    verdicts = {r["rule"]: r["verdict"] for r in decision["rules"]}
    assert decision["passed"] is False and verdicts["mean_invalid_activation_ratio"] == "fail"


@pytest.mark.kfp
def test_hard_fail_raises_with_the_failing_rules(s3_set):
    with pytest.raises(GateFailed, match=r"policy 'strict'.*mean_invalid_activation_ratio @ all = [0-9.]+, limit <= 0"):
        local_run(args(s3_set, "strict", "run-hard", fail_on_violation=True), s3_set["root"],
                  package_path=COMPILED, echo=False)
    # the report of why is exported before the task fails (failed tasks store no artifacts)
    assert exported(s3_set, "run-hard") == EXPORTS
    assert not list(Path(s3_set["root"]).glob("*/promote"))


@pytest.mark.kfp
def test_broken_card_fails_at_load_model(s3_set):
    storage.write_bytes(s3_set["card"], yaml.safe_dump({"name": "t", "arch": "zoo:tiny_cnn", "num_classes": 3,
                                                        "weights": "models/missing.safetensors"}).encode())
    with pytest.raises(PipelineFailed, match=r"load-model.*ModelCardError: cannot read weights.*missing"):
        local_run(args(s3_set, "loose", "run-bad"), s3_set["root"], echo=False)  # the Python definition
    assert exported(s3_set, "run-bad") == []


def test_a_docker_folder_does_not_pass_for_the_docker_sdk(monkeypatch):
    """The repository's docker/ folder on sys.path must not make kfp.local think Docker's SDK is there."""
    import importlib.util
    import sys

    from camgate.kfp.pipelines import _shadowed_docker_sdk

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delitem(sys.modules, "docker", raising=False)
    spec = importlib.util.find_spec("docker")
    if spec.origin not in (None, "namespace"):
        pytest.skip("the Docker SDK is installed; it wins over a namespace folder")
    _shadowed_docker_sdk()
    assert sys.modules["docker"] is None
    with pytest.raises(ImportError):
        import docker  # noqa: F401


def test_progress_lines_survive_tasks_printing_from_threads():
    """ParallelFor tasks print from threads; print() writes text and newline apart, so two messages
    can share a line: each is still announced, with its own status."""
    import io

    from camgate.kfp.pipelines import _Tee

    got = []
    tee = _Tee(io.StringIO(), False, got.append)
    tee.write("\x1b[95mTask 'shard-worker'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
    tee.write("Executing task 'shard-worker-2'")
    tee.write("\n")
    tee.write("Task 'gate' finished with status FAILURE\n")
    assert got == ["Task 'shard-worker' finished with status SUCCESS", "Executing task 'shard-worker-2'",
                   "Task 'gate' finished with status FAILURE"]


def test_overlapping_tasks_keep_their_lines_and_the_callers_logging():
    """Two ParallelFor tasks overlap the way kfp.local runs them: the one that ends second still logs its
    line, and the caller's logging and print() are as before the run."""
    import builtins
    import contextlib
    import io
    import logging

    from kfp.local import logging_utils

    from camgate.kfp.pipelines import _parallel_safe_logging

    def overlap():
        a, b = logging_utils.local_logger_context(), logging_utils.local_logger_context()
        pa, pb = logging_utils.indented_print(), logging_utils.indented_print()
        a.__enter__(), pa.__enter__(), b.__enter__(), pb.__enter__()
        logging.info("task a finished")
        a.__exit__(None, None, None), pa.__exit__(None, None, None)
        logging.info("task b finished")  # without the fix: dropped (level back to the caller's)
        b.__exit__(None, None, None), pb.__exit__(None, None, None)

    root, before = logging.getLogger(), (logging.getLogger().level, logging.getLogger().handlers[:], builtins.print)
    root.setLevel(logging.WARNING)
    caller = (root.level, root.handlers[:], builtins.print)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), _parallel_safe_logging():
            overlap()
        assert "task a finished" in out.getvalue() and "task b finished" in out.getvalue()
        assert (root.level, root.handlers, builtins.print) == caller  # not a task's handler or indented print
        # what the fix is for: kfp.local alone drops b's line and leaves its state behind
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            overlap()
        assert "task b finished" not in out.getvalue() and builtins.print is not caller[2]
    finally:
        root.setLevel(before[0])
        root.handlers[:] = before[1]
        builtins.print = before[2]


@pytest.mark.kfp
def test_a_segmentation_model_through_the_pipeline_in_shards(s3_bucket, tmp_path, monkeypatch):
    """The compiled pipeline carries the task: a segmentation card (tests/zoo.py's RegionSegmenter, whose
    class 1 reads only its region, masked invalid) in two shards, the classes named, gated per class;
    the merged results equal one process's run row for row."""
    import numpy as np
    import pyarrow.parquet as pq
    from helpers import png

    from camgate.io.results import read_table
    from camgate.runner import run

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the tasks import the card's zoo factory
    prefix = storage.join(s3_bucket, "seg")
    rng = np.random.default_rng(0)
    lines = ["image,mask"]
    for i in range(4):
        m = np.zeros((48, 64), np.uint8)
        m[0:24, 0:32] = 255  # class 1's region
        storage.write_bytes(storage.join(prefix, f"images/{i}.png"), png(rng.integers(0, 255, (48, 64, 3), np.uint8)))
        storage.write_bytes(storage.join(prefix, f"masks/{i}.png"), png(m))
        lines.append(f"images/{i}.png,masks/{i}.png")
    data = storage.join(prefix, "data.csv")
    storage.write_bytes(data, ("\n".join(lines) + "\n").encode())
    card = storage.join(prefix, "card.yaml")
    storage.write_bytes(card, yaml.safe_dump({
        "name": "segmenter", "task": "segmentation", "arch": "zoo:region_segmenter", "num_classes": 3,
        "classes": ["background", "a", "b"], "input": {"size": [48, 64]}, "target_layer": "gate"}).encode())
    policy = storage.join(prefix, "policy.yaml")
    storage.write_bytes(policy, yaml.safe_dump({"name": "seg", "per_class": "predicted", "rules": {
        "mean_invalid_activation_ratio": {"max": 0.5}, "no_activation_rate": None}}).encode())
    r = local_run({"model_card": card, "data": data, "policy": policy, "output_prefix": storage.join(prefix, "out"),
                   "shards": 2, "classes": "a,b", "batch_size": 2}, str(tmp_path / "kfp"), package_path=COMPILED,
                  echo=False)
    assert r["passed"] is False and r["n_images"] == 8  # rows: 4 images x 2 classes
    decision = json.loads(storage.read_bytes(storage.join(prefix, "out", "decision.json")))
    verdicts = {x["scope"]: x["verdict"] for x in decision["rules"] if x["rule"] == "mean_invalid_activation_ratio"}
    assert verdicts == {"all": "pass", "class=a": "fail", "class=b": "pass"}
    record = json.loads(storage.read_bytes(storage.join(prefix, "out", "record.json")))
    assert record["task"] == "segmentation" and record["segmentation"]["classes"] == {"a": 4, "b": 4}
    merged = read_table(storage.join(prefix, "out", "results.parquet"))
    one = str(tmp_path / "one.parquet")
    run(card, data, one, classes="a,b", progress=False)
    cols = ["row", "target_class", "status", "invalid_activation_ratio", "outside_region_ratio", "region_invalid_area"]
    assert merged.select(cols).to_pylist() == pq.read_table(one).select(cols).to_pylist()
