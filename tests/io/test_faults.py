"""Faults for real: the process killed mid-run, the S3 server restarted mid-run."""
import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import yaml
from helpers import (CAMGATE, computed, counting_env, make_set)

from camgate.io import results, storage


def _wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _parts(folder):
    return [u for u in storage.list_uris(str(folder)) if "part-" in u]








def counting_card(tmp_path):
    (tmp_path / "count.yaml").write_text(yaml.safe_dump({"name": "c", "arch": "zoo:counting_net", "num_classes": 3,
                                                         "input": {"size": [32, 32]}}))
    return str(tmp_path / "count.yaml")


def test_sigkill_then_rerun_computes_only_the_missing_rows(tmp_path):
    _, manifest = make_set(tmp_path, n=40)
    args = ["run", "--model", counting_card(tmp_path), "--data", manifest, "--batch-size", "4",
            "--checkpoint-rows", "4", "--checkpoint", str(tmp_path / "ckpt"), "--quiet"]
    ref = str(tmp_path / "ref.parquet")
    count, env = counting_env(tmp_path, "ref.count")
    subprocess.run(CAMGATE + args + ["--out", ref], check=True, timeout=300, env=env)
    assert computed(count) == 40

    out = str(tmp_path / "r.parquet")
    count, env = counting_env(tmp_path, "killed.count")
    proc = subprocess.Popen(CAMGATE + args + ["--out", out], env=env)
    _wait_for(lambda: len(_parts(tmp_path / "ckpt")) >= 3, 120, "committed parts")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "a killed run must leave no (half-written) result file"
    done = 4 * len(_parts(tmp_path / "ckpt"))
    assert 12 <= done < 40

    count, env = counting_env(tmp_path, "resumed.count")
    p = subprocess.run(CAMGATE + args + ["--out", out], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    # the rows committed before the kill are taken as they are: only the rest is computed again
    assert computed(count) == summary["computed"] == 40 - done and summary["resumed"] == done
    a, b = pq.read_table(ref), pq.read_table(out)
    assert a.num_rows == b.num_rows == 40
    assert a.equals(b.cast(a.schema)) or a.to_pylist() == b.to_pylist()
    assert not os.path.exists(tmp_path / "ckpt")


def test_rows_failed_on_the_storage_service_are_retried_by_the_next_run(s3_server, s3_bucket, tmp_path):
    """Half the images sit on S3 while S3 is unreachable: those rows fail as storage errors, the parts are
    kept, and the same command once S3 is back computes exactly those rows again."""

    _, manifest = make_set(tmp_path, n=8)
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    for i in range(2, len(lines), 2):  # odd rows (line 0 is the header): the image lives on S3
        rel = lines[i].split(",")[0]
        uri = storage.join(s3_bucket, rel)
        storage.write_bytes(uri, (tmp_path / rel).read_bytes())
        lines[i] = lines[i].replace(rel, uri, 1)
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    out, ckpt = str(tmp_path / "r.parquet"), str(tmp_path / "ckpt")
    args = ["run", "--model", counting_card(tmp_path), "--data", manifest, "--out", out, "--checkpoint", ckpt,
            "--checkpoint-rows", "2", "--batch-size", "2", "--quiet"]

    count, env = counting_env(tmp_path, "down.count")
    env.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", CAMGATE_S3_RETRIES="1")  # nothing listens there
    p = subprocess.run(CAMGATE + args, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    t = pq.read_table(out)
    kinds = t.column("error_kind").to_pylist()
    assert kinds == [None, "storage"] * 4 and json.loads(p.stdout)["storage_errors"] == 4
    assert "failed after 1 attempts" in t.column("error").to_pylist()[1]
    assert "run the same command again" in p.stderr and _parts(ckpt)
    assert computed(count) == 4

    count, env = counting_env(tmp_path, "back.count")
    p = subprocess.run(CAMGATE + args, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert computed(count) == summary["computed"] == 4 and summary["resumed"] == 4
    t = pq.read_table(out)
    assert t.column("status").to_pylist() == ["ok"] * 8 and t.column("row").to_pylist() == list(range(8))
    assert not os.path.exists(ckpt)


def test_changed_command_does_not_resume_foreign_parts(tmp_path):
    card, manifest = make_set(tmp_path, n=8)
    out = str(tmp_path / "r.parquet")
    from camgate.runner.heatmaps import run

    # parts left by a run with another method must not leak into this one
    w = results.ResultsWriter(out, results.schema(), 2, fingerprint="other-run")
    w.__enter__()
    w.write([{"image_id": "stale", "status": "ok"}] * 2)
    assert _parts(out + ".parts")
    s = run(card, manifest, out, progress=False, checkpoint_rows=2)
    t = pq.read_table(out)
    assert s.rows == t.num_rows == 8 and "stale" not in t.column("image_id").to_pylist()


def test_s3_server_restarted_mid_run_completes_with_all_rows(s3_server, s3_bucket, tmp_path):
    card, manifest = make_set(tmp_path, n=40, prefix=storage.join(s3_bucket, "set"))
    out = storage.join(s3_bucket, "out", "r.parquet")
    proc = subprocess.Popen(CAMGATE + ["run", "--model", card, "--data", manifest, "--out", out, "--batch-size", "2",
                                       "--workers", "1", "--checkpoint-rows", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_parts(out + ".parts")) >= 2, 120, "first committed parts")
    assert proc.poll() is None
    s3_server.restart(hard=True)  # a crash of the object store, then it comes back
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "retrying" in stderr  # the run really went through the outage
    t = results.read_table(out)
    assert t.num_rows == 40 and set(t.column("status").to_pylist()) == {"ok"}, t.column("error").to_pylist()
