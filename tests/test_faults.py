"""Faults for real: the process killed mid-run, the S3 server restarted mid-run."""
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq

from camgate import results, storage
from test_run import CAMGATE, make_set


def _wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _parts(out):
    return [u for u in storage.list_uris(out + ".parts") if "part-" in u]


def test_sigkill_then_rerun_resumes_and_equals_uninterrupted(tmp_path):
    card, manifest = make_set(tmp_path, n=40)
    args = ["run", "--model", card, "--data", manifest, "--batch-size", "4", "--checkpoint-rows", "4", "--quiet"]
    ref = str(tmp_path / "ref.parquet")
    subprocess.run(CAMGATE + args + ["--out", ref], check=True, timeout=300)

    out = str(tmp_path / "r.parquet")
    proc = subprocess.Popen(CAMGATE + args + ["--out", out])
    _wait_for(lambda: len(_parts(out)) >= 3, 120, "committed parts")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "a killed run must leave no (half-written) result file"
    done = len(_parts(out))
    assert 3 <= done < 10

    p = subprocess.run(CAMGATE + args + ["--out", out], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    a, b = pq.read_table(ref), pq.read_table(out)
    assert a.num_rows == b.num_rows == 40
    assert a.equals(b.cast(a.schema)) or a.to_pylist() == b.to_pylist()
    assert not os.path.exists(out + ".parts")


def test_changed_command_does_not_resume_foreign_parts(tmp_path):
    card, manifest = make_set(tmp_path, n=8)
    out = str(tmp_path / "r.parquet")
    from camgate.runner import run

    # parts left by a run with another method must not leak into this one
    w = results.ResultsWriter(out, results.schema(), 2, fingerprint="other-run")
    w.__enter__()
    w.write([{"image_id": "stale", "status": "ok"}] * 2)
    assert _parts(out)
    s = run(card, manifest, out, progress=False, checkpoint_rows=2)
    t = pq.read_table(out)
    assert s.rows == t.num_rows == 8 and "stale" not in t.column("image_id").to_pylist()


def test_s3_server_restarted_mid_run_completes_with_all_rows(s3_server, s3_bucket, tmp_path):
    card, manifest = make_set(tmp_path, n=40, prefix=storage.join(s3_bucket, "set"))
    out = storage.join(s3_bucket, "out", "r.parquet")
    proc = subprocess.Popen(CAMGATE + ["run", "--model", card, "--data", manifest, "--out", out, "--batch-size", "2",
                                       "--workers", "1", "--checkpoint-rows", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_parts(out)) >= 2, 120, "first committed parts")
    assert proc.poll() is None
    s3_server.restart(hard=True)  # a crash of the object store, then it comes back
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "retrying" in stderr  # the run really went through the outage
    t = results.read(out)
    assert t.num_rows == 40 and set(t.column("status").to_pylist()) == {"ok"}, t.column("error").to_pylist()
