"""Scale-out: shard manifests, one run per shard, merge == one run over the whole manifest."""
import json
import math
import os
import re

import numpy as np
import pyarrow as pa
import pytest
import yaml
from helpers import HERE, computed, counting_env, make_set, processes  # HERE: tests/, where zoo.py lives

from camgate.cli import main
from camgate.data.manifest import load_items
from camgate.io import results, storage
from camgate.runner.shards import MergeError, merge, plan, run_shard

BAD = ["images/nope.png,masks/000.png,1,cam0", "../outside.png,masks/001.png,2,cam1"]


def tiny_card(folder, arch="zoo:tiny_cnn") -> str:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "arch": arch, "num_classes": 3, "input": {"size": [32, 32]}}))
    return str(path)


@pytest.fixture
def zoo_path(monkeypatch):
    monkeypatch.syspath_prepend(HERE)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_same_rows(a_uri, b_uri):
    a, b = results.read_table(a_uri).to_pylist(), results.read_table(b_uri).to_pylist()
    assert [r["row"] for r in a] == [r["row"] for r in b] == list(range(len(a)))
    for x, y in zip(a, b):
        for k in x:
            if k == "cam" and x[k] is not None:  # batches differ, so float sums may differ in the last bits
                a_map, b_map = results.cam_array(x), results.cam_array(y)
                assert np.allclose(a_map, b_map, rtol=1e-4, atol=1e-6 * max(1e-30, float(a_map.max()))), x["row"]
            elif k.endswith(("_ratio", "_share", "_score")):
                if x[k] is None or (isinstance(x[k], float) and math.isnan(x[k])):
                    assert y[k] is None or math.isnan(y[k]), (k, x, y)
                else:
                    assert abs(x[k] - y[k]) <= 1e-6, (k, x[k], y[k])
            else:
                assert x[k] == y[k], (k, x[k], y[k])


def test_shard_run_each_merge_equals_one_run(tmp_path, capsys, zoo_path):
    card = tiny_card(tmp_path)
    _, manifest = make_set(tmp_path, n=9, bad=BAD)  # 11 rows: shards of 4, 4, 3 (sizes differ by <= 1)
    code, out, err = cli(capsys, "shard", manifest, "--shards", "3", "--out", str(tmp_path / "shards"))
    assert code == 0, err
    uris = json.loads(out)
    assert [os.path.basename(u) for u in uris] == [f"shard-0000{k}-of-00003.parquet" for k in range(3)]
    assert [len(load_items(u)) for u in uris] == [3, 4, 4]
    assert [it.index for u in uris for it in load_items(u)] == list(range(11))
    parts = []
    for k, uri in enumerate(uris):
        parts.append(str(tmp_path / f"part{k}.parquet"))
        assert cli(capsys, "run", "--model", card, "--data", uri, "--out", parts[-1], "--batch-size", "2",
                   "--quiet")[0] == 0
    whole = str(tmp_path / "whole.parquet")
    assert cli(capsys, "run", "--model", card, "--data", manifest, "--out", whole, "--batch-size", "4",
               "--quiet")[0] == 0
    merged = str(tmp_path / "merged.parquet")
    code, out, err = cli(capsys, "merge", *reversed(parts), "--out", merged, "--data", manifest)
    assert code == 0, err
    assert json.loads(out)["rows"] == 11
    assert_same_rows(whole, merged)
    t = results.read_table(merged)
    assert t.schema.equals(results.read_table(whole).schema, check_metadata=False)
    # the error rows survive sharding with the very same message
    errors = [r for r in t.to_pylist() if r["status"] == "error"]
    assert [r["row"] for r in errors] == [9, 10]
    assert "nope.png" in errors[0]["error"] and "escapes the manifest folder" in errors[1]["error"]
    md, md_whole = results.run_metadata(t), results.run_metadata(results.read_table(whole))
    assert md["data"] == manifest and md["shards"] == uris
    # the same run's metadata; when it started differs (the parts ran first)
    assert md["started_at"] <= md_whole["started_at"] and md["data_sha256"] == md_whole["data_sha256"]
    assert {k: v for k, v in md.items() if k not in ("shards", "started_at")} == {
        k: v for k, v in md_whole.items() if k != "started_at"}


def test_merge_names_missing_and_duplicated_shards(tmp_path, capsys, zoo_path):
    card = tiny_card(tmp_path)
    _, manifest = make_set(tmp_path, n=6)
    uris = plan(manifest, 3, str(tmp_path / "s"))
    parts = []
    for k, uri in enumerate(uris):
        parts.append(str(tmp_path / f"p{k}.parquet"))
        assert cli(capsys, "run", "--model", card, "--data", uri, "--out", parts[-1], "--quiet")[0] == 0
    out = str(tmp_path / "m.parquet")
    code, _, err = cli(capsys, "merge", parts[0], parts[2], "--out", out, "--data", manifest)
    assert code == 2 and "rows 2-3 are in no part" in err and uris[1] in err, err
    code, _, err = cli(capsys, "merge", parts[0], parts[2], "--out", out)  # without the data: still named
    assert code == 2 and "rows 2-3 are in no part" in err and uris[1] in err, err
    (tmp_path / "copy.parquet").write_bytes((tmp_path / "p1.parquet").read_bytes())
    code, _, err = cli(capsys, "merge", *parts, str(tmp_path / "copy.parquet"), "--out", out, "--data", manifest)
    assert code == 2 and "rows 2-3 are in more than one part" in err and "copy.parquet" in err, err
    code, _, err = cli(capsys, "merge", parts[0], parts[0], "--out", out)
    assert code == 2 and "given more than once" in err
    lines = open(manifest).read().splitlines()
    (tmp_path / "short.csv").write_text("\n".join(lines[:5]) + "\n")
    code, _, err = cli(capsys, "merge", *parts, "--out", out, "--data", str(tmp_path / "short.csv"))
    assert code == 2 and "rows 4-5 of the parts are not in data" in err, err
    assert not os.path.exists(out)
    # parts of another manifest (same rows, other images) are refused
    _, other = make_set(tmp_path / "other", n=6)
    with pytest.raises(MergeError, match=r"row 0 is .*000\.png in a part but .*other.*000\.png in the data"):
        merge(parts, out, data=other)


def test_merge_refuses_parts_of_different_runs(tmp_path, zoo_path):
    card = tiny_card(tmp_path)
    _, manifest = make_set(tmp_path, n=4)
    a, b = plan(manifest, 2, str(tmp_path / "s"))
    from camgate.runner.heatmaps import run

    run(card, a, str(tmp_path / "a.parquet"), progress=False)
    run(card, b, str(tmp_path / "b.parquet"), method="gradcam++", progress=False)
    with pytest.raises(MergeError, match=r"come from different runs: 'method' is \"gradcam\" in one and "
                                         r"\"gradcam\+\+\" in the other"):
        merge([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "m.parquet"))


def test_plan_is_deterministic_balanced_and_keeps_rows(tmp_path, capsys, zoo_path):
    # a JSONL manifest with a metadata column that is empty in some shards and numbers in others
    rows = [{"image": f"images/{i:03d}.png", "mask": f"masks/{i:03d}.png", "label": i % 3,
             "speed": (1.5 * i if i > 5 else None)} for i in range(8)]
    make_set(tmp_path, n=8)
    card = tiny_card(tmp_path)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = plan(str(tmp_path / "m.jsonl"), 3, str(tmp_path / "a"))
    b = plan(str(tmp_path / "m.jsonl"), 3, str(tmp_path / "b"))
    assert [open(x, "rb").read() == open(y, "rb").read() for x, y in zip(a, b)] == [True] * 3
    sizes = [len(load_items(u)) for u in a]
    assert sizes == [2, 3, 3] and max(sizes) - min(sizes) <= 1
    items = [it for u in a for it in load_items(u)]
    full = load_items(str(tmp_path / "m.jsonl"))
    assert [(it.index, it.image, it.mask, it.label, it.meta) for it in items] == \
        [(it.index, it.image, it.mask, it.label, it.meta) for it in full]
    # merged, that column has the whole run's type, though one shard saw no value of it
    from camgate.runner.heatmaps import run

    for k, u in enumerate(a):
        run(card, u, str(tmp_path / f"p{k}.parquet"), progress=False)
    run(card, str(tmp_path / "m.jsonl"), str(tmp_path / "whole.parquet"), progress=False)
    merge([str(tmp_path / f"p{k}.parquet") for k in range(3)], str(tmp_path / "merged.parquet"))
    assert_same_rows(str(tmp_path / "whole.parquet"), str(tmp_path / "merged.parquet"))
    assert results.read_table(str(tmp_path / "merged.parquet")).schema.field("speed").type == pa.float64()
    # a prefix data set: an image without a mask stays that item's error in its shard
    os.remove(tmp_path / "masks" / "007.png")
    (shard,) = plan(str(tmp_path), 1, str(tmp_path / "e"))
    assert [it.error for it in load_items(shard)] == [it.error for it in load_items(str(tmp_path))]
    assert "no mask with stem '007'" in load_items(shard)[7].error
    # more shards than items: one item each; bad counts are exit 2 before anything is read
    assert len(plan(str(tmp_path / "m.jsonl"), 20, str(tmp_path / "c"))) == 8
    code, _, err = cli(capsys, "shard", str(tmp_path / "missing.csv"), "--shards", "0", "--out", str(tmp_path / "d"))
    assert code == 2 and "shards must be an integer >= 1" in err


def test_manifest_row_column_is_honoured_and_checked(tmp_path):
    make_set(tmp_path, n=3)
    (tmp_path / "m.csv").write_text("row,image,mask\n7,images/000.png,masks/000.png\n3,images/001.png,\n")
    assert [it.index for it in load_items(str(tmp_path / "m.csv"))] == [7, 3]
    from camgate.data.manifest import DataError

    (tmp_path / "d.csv").write_text("row,image\n1,images/000.png\n1,images/001.png\n")
    with pytest.raises(DataError, match="row number 1 appears twice"):
        load_items(str(tmp_path / "d.csv"))
    (tmp_path / "n.csv").write_text("row,image\n-1,images/000.png\n")
    with pytest.raises(DataError, match=r"column 'row' must be a row number .* got -1"):
        load_items(str(tmp_path / "n.csv"))


def test_shard_worker_skips_a_finished_shard(tmp_path, monkeypatch, zoo_path):
    card = tiny_card(tmp_path, "zoo:counting_net")
    _, manifest = make_set(tmp_path, n=5)
    (shard,) = plan(manifest, 1, str(tmp_path / "s"))
    count, env = counting_env(tmp_path, "c1")
    monkeypatch.setenv("CAMGATE_TEST_COUNT", str(count))
    first = run_shard(card, shard, batch_size=2)
    assert first["skipped"] is False and computed(count) == 5 and os.path.exists(first["part"])
    again = run_shard(card, shard, batch_size=2)
    assert again["skipped"] is True and computed(count) == 5
    # other settings: the marker does not match, the shard is computed again
    assert run_shard(card, shard, batch_size=2, method="gradcam++")["skipped"] is False and computed(count) == 10
    os.remove(first["part"].replace(".results.parquet", ".done.json"))
    assert run_shard(card, shard, batch_size=2, method="gradcam++")["skipped"] is False and computed(count) == 15


# --------------------------------------------------------------------------- the pipeline, under kfp.local


@pytest.mark.kfp
def test_pipeline_with_three_shards_equals_one_and_reruns_only_an_unfinished_shard(s3_set, tmp_path, monkeypatch):
    pytest.importorskip("kfp")
    from helpers import COMPILED, EXPORTS, args, exported

    from camgate.kfp import local_run

    # the zoo's counting model (tiny_cnn's weights) tells how many images each run really computes
    card = yaml.safe_load(storage.read_bytes(s3_set["card"]))
    storage.write_bytes(s3_set["card"], yaml.safe_dump({**card, "arch": "zoo:counting_net"}).encode())
    count = tmp_path / "count"
    monkeypatch.setenv("CAMGATE_TEST_COUNT", str(count))

    lines = []

    def run(out, shards, name):
        before, seen = computed(count), processes(count)
        r = local_run(args(s3_set, "loose", out, shards=shards), s3_set["root"] + name, package_path=COMPILED,
                      echo=False, progress=lines.append)
        assert r["n_images"] == 6 and exported(s3_set, out) == EXPORTS
        return r, storage.join(s3_set["bucket"], out), computed(count) - before, processes(count) - seen

    one, one_at, n1, _ = run("one", 1, "a")
    lines.clear()
    three, three_at, n3, workers = run("three", 3, "b")
    # each shard is its own task, in its own process, and each is announced (what `camgate demo` shows),
    # though kfp.local swaps the logging state from the loop's threads at once
    assert len(workers) == 3
    assert lines.count("Task 'shard-worker' finished with status SUCCESS") == 3, lines
    assert n1 == n3 == 6
    assert {k: one[k] for k in ("passed", "n_images", "error_rate")} == \
        {k: three[k] for k in ("passed", "n_images", "error_rate")}
    assert abs(one["mean_invalid_activation_ratio"] - three["mean_invalid_activation_ratio"]) <= 1e-6
    local = {}
    for name, at in (("one", one_at), ("three", three_at)):
        local[name] = str(tmp_path / f"{name}.parquet")
        storage.download(storage.join(at, "results.parquet"), local[name])
    assert_same_rows(local["one"], local["three"])
    shards = [u.rsplit("/", 1)[1] for u in storage.list_uris(storage.join(three_at, "shards"))]
    assert [u for u in shards if u.endswith(".done.json")] == \
        [f"shard-0000{k}-of-00003.done.json" for k in range(3)]

    # one shard did not finish (its marker is gone): the same run again computes that shard only
    storage.delete(storage.join(three_at, "shards", "shard-00001-of-00003.done.json"))
    again, _, n, workers = run("three", 3, "c")
    assert n == 2 and len(workers) == 1 and again["n_images"] == 6
    storage.download(storage.join(three_at, "results.parquet"), local["three"])
    assert_same_rows(local["one"], local["three"])


def test_components_plan_work_and_merge(tmp_path, zoo_path):
    pytest.importorskip("kfp")
    from helpers import tiny_card as weighted_card
    from kfp import dsl

    from camgate.kfp import load_model, merge_results, plan_shards, shard_worker

    _, manifest = make_set(tmp_path, n=5, bad=BAD[:1])
    model = dsl.Model(uri=str(tmp_path / "model"))
    load_model.python_func(model_card=str(weighted_card(tmp_path)), model=model)
    shards = plan_shards.python_func(data=manifest, shards=2, out_prefix=str(tmp_path / "out") + "/shards")
    parts = [shard_worker.python_func(model=model, shard=s, batch_size=2, device="cpu") for s in shards]
    assert parts == [str(tmp_path / "out" / "shards" / f"shard-0000{k}-of-00002.results.parquet") for k in range(2)]
    merged = dsl.Dataset(uri=str(tmp_path / "merged"))
    merge_results.python_func(parts=parts[::-1], results=merged, data=manifest,
                              export_uri=str(tmp_path / "out") + "//results.parquet")
    assert merged.metadata["rows"] == 6 and merged.metadata["counts"]["error"] == 1
    assert merged.metadata["exported"] == str(tmp_path / "out" / "results.parquet")
    assert results.read_table(merged.path).column("row").to_pylist() == list(range(6))
    with pytest.raises(MergeError, match=r"rows 3-5 are in no part.*shard-00001-of-00002\.parquet"):
        merge_results.python_func(parts=parts[:1], results=dsl.Dataset(uri=str(tmp_path / "m2")), data=manifest)
    # the worker's precision reaches the run (recorded in the part); a shard done at other settings is redone
    bf16 = shard_worker.python_func(model=model, shard=shards[0], batch_size=2, device="cpu", amp="bf16")
    assert results.run_metadata(bf16)["amp"] == "bf16"


def test_compile_parallelism_is_a_compile_option(tmp_path, capsys):
    pytest.importorskip("kfp")
    code, _, err = cli(capsys, "compile", "--root", str(tmp_path), "--parallelism", "3")
    assert code == 0, err
    spec = next(yaml.safe_load_all((tmp_path / "pipelines" / "heatmap_gate.yaml").read_text()))
    (loop,) = [t for t in spec["root"]["dag"]["tasks"].values() if "iteratorPolicy" in t]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert spec["root"]["inputDefinitions"]["parameters"]["shards"]["defaultValue"] == 1
    # the checked-in pipeline: the default
    spec = next(yaml.safe_load_all(open(os.path.join(HERE, "..", "pipelines", "heatmap_gate.yaml")).read()))
    (loop,) = [t for t in spec["root"]["dag"]["tasks"].values() if "iteratorPolicy" in t]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 8
    code, _, err = cli(capsys, "compile", "--root", str(tmp_path), "--parallelism", "-1")
    assert code == 2 and "parallelism must be an integer >= 0" in err


def test_shard_worker_retries_resuming_from_the_committed_rows(tmp_path, monkeypatch, caplog, zoo_path):
    card = tiny_card(tmp_path, "zoo:counting_net")
    _, manifest = make_set(tmp_path, n=5)
    (shard,) = plan(manifest, 1, str(tmp_path / "s"))
    count, _ = counting_env(tmp_path, "c")
    monkeypatch.setenv("CAMGATE_TEST_COUNT", str(count))
    # a folder where the part should go: every attempt commits its rows, then fails to write the part
    os.makedirs(shard.replace(".parquet", ".results.parquet"))
    with pytest.raises(storage.StorageError, match="is a directory"):
        run_shard(card, shard, batch_size=2, checkpoint_rows=2, attempts=2)
    assert "attempt 1 of 2 failed" in caplog.text
    assert computed(count) == 5  # the second attempt resumed: no image computed twice


@pytest.mark.kfp
def test_a_killed_pipeline_run_resumes_and_computes_only_unfinished_shards(s3_set, tmp_path, monkeypatch):
    """The whole local run is killed (SIGKILL, every task process) once a shard has finished; the same
    run submitted again skips the finished shards and computes only the others."""
    pytest.importorskip("kfp")
    import signal
    import subprocess
    import sys
    import time

    from helpers import COMPILED, args

    from camgate.kfp import local_run

    card = yaml.safe_load(storage.read_bytes(s3_set["card"]))
    storage.write_bytes(s3_set["card"], yaml.safe_dump({**card, "arch": "zoo:counting_net"}).encode())
    first, second = tmp_path / "first.count", tmp_path / "second.count"
    run_args = args(s3_set, "loose", "killed", shards=3, batch_size=1)
    markers = lambda: [u for u in storage.list_uris(storage.join(s3_set["bucket"], "killed", "shards"))  # noqa: E731
                       if u.endswith(".done.json")]
    script = ("import json, sys\nfrom camgate.kfp import local_run\n"
              "local_run(json.loads(sys.argv[1]), sys.argv[2], package_path=sys.argv[3], echo=False)\n")
    env = dict(os.environ, CAMGATE_TEST_COUNT=str(first), CAMGATE_TEST_SLOW="1.5")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(run_args), s3_set["root"] + "k1", str(COMPILED)],
                            env=env, start_new_session=True)
    end = time.time() + 600
    while not markers() and proc.poll() is None and time.time() < end:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and every task it started
    proc.wait()
    done = len(markers())
    assert 1 <= done < 3, f"{done} shards finished before the kill"

    monkeypatch.setenv("CAMGATE_TEST_COUNT", str(second))
    r = local_run(run_args, s3_set["root"] + "k2", package_path=COMPILED, echo=False)
    assert r["n_images"] == 6 and len(markers()) == 3
    # the finished shards (2 images each) were not computed again
    assert 0 < computed(second) <= 2 * (3 - done)
    out = str(tmp_path / "killed.parquet")
    storage.download(storage.join(s3_set["bucket"], "killed", "results.parquet"), out)
    assert results.read_table(out).column("row").to_pylist() == list(range(6))


# --------------------------------------------------------------------------- what a shard's key and rows rest on


def test_a_shard_whose_files_changed_under_the_same_uris_is_computed_again(tmp_path, monkeypatch, zoo_path):
    from helpers import png

    card = tiny_card(tmp_path, "zoo:counting_net")
    _, manifest = make_set(tmp_path, n=6)
    uris = plan(manifest, 3, str(tmp_path / "s"))  # rows 0-1, 2-3, 4-5
    count, _ = counting_env(tmp_path, "c")
    monkeypatch.setenv("CAMGATE_TEST_COUNT", str(count))

    def submit() -> list[bool]:
        return [run_shard(card, u, batch_size=2)["skipped"] for u in uris]

    assert submit() == [False] * 3 and computed(count) == 6
    assert submit() == [True] * 3 and computed(count) == 6
    # new bytes for row 3's image under the same URI: its shard, and only it, is computed again
    (tmp_path / "images" / "003.png").write_bytes(png(np.full((20, 30, 3), 200, np.uint8)))
    assert submit() == [True, False, True] and computed(count) == 8
    part = results.read_table(run_shard(card, uris[1], batch_size=2)["part"]).to_pylist()
    assert (part[1]["row"], part[1]["image_width"], part[1]["image_height"]) == (3, 30, 20)
    # a mask changed the same way
    (tmp_path / "masks" / "004.png").write_bytes(png(np.full((24, 32), 255, np.uint8)))
    assert submit() == [True, True, False] and computed(count) == 10
    part = results.read_table(run_shard(card, uris[2], batch_size=2)["part"])
    assert part.column("invalid_activation_ratio")[0].as_py() == 1.0
    assert submit() == [True] * 3 and computed(count) == 10


def test_a_static_mask_given_to_a_shard_applies_as_in_run(tmp_path, capsys, zoo_path):
    from helpers import png

    card = tiny_card(tmp_path)
    static = tmp_path / "static.png"
    static.write_bytes(png(np.pad(np.full((8, 32), 255, np.uint8), ((0, 16), (0, 0)))))
    # a prefix data set without masks/ (a fixed camera), and a manifest whose rows name masks and a bad image
    root = tmp_path / "set"
    make_set(root, n=4, bad=BAD)
    prefix = tmp_path / "prefix"
    (prefix / "images").mkdir(parents=True)
    for f in sorted((root / "images").iterdir()):
        (prefix / "images" / f.name).write_bytes(f.read_bytes())
    for data in (str(prefix), str(root / "manifest.csv")):
        code, out, err = cli(capsys, "shard", data, "--shards", "2", "--out", str(tmp_path / "sh" / data[-5:]))
        assert code == 0, err
        shards = json.loads(out)
        parts = []
        for k, uri in enumerate(shards):
            parts.append(str(tmp_path / f"{data[-5:]}-part{k}.parquet"))
            assert cli(capsys, "run", "--model", card, "--data", uri, "--out", parts[-1], "--static-mask", str(static),
                       "--quiet")[0] == 0
        whole = str(tmp_path / f"{data[-5:]}-whole.parquet")
        assert cli(capsys, "run", "--model", card, "--data", data, "--out", whole, "--static-mask", str(static),
                   "--quiet")[0] == 0
        merged = str(tmp_path / f"{data[-5:]}-merged.parquet")
        code, _, err = cli(capsys, "merge", *parts, "--out", merged, "--data", data)
        assert code == 0, err
        assert_same_rows(whole, merged)
        rows = results.read_table(merged).to_pylist()
        assert {r["mask"] for r in rows} == {str(static)}
        want = ["ok"] * 4 + (["error"] * 2 if data.endswith(".csv") else [])
        assert [r["status"] for r in rows] == want, [r["error"] for r in rows]
        # the worker step takes the same path
        out = run_shard(card, shards[0], static_mask=str(static))
        assert [r["status"] for r in results.read_table(out["part"]).to_pylist()] == want[:len(load_items(shards[0]))]
    # without the static mask the shard's items keep their own mask errors, as the data set's do
    (shard, _) = plan(str(prefix), 2, str(tmp_path / "nomask"))
    assert all("no mask with stem" in it.error for it in load_items(shard))


def test_metadata_the_results_cannot_hold_is_refused_or_kept_as_text_before_any_work(tmp_path, capsys, zoo_path):
    card = tiny_card(tmp_path)
    make_set(tmp_path, n=4)
    big = 2 ** 63
    rows = "".join(f"images/{i:03d}.png,masks/{i:03d}.png,{big + i if i % 2 else i}\n" for i in range(4))
    (tmp_path / "big.csv").write_text("image,mask,serial\n" + rows)
    whole, merged = str(tmp_path / "whole.parquet"), str(tmp_path / "merged.parquet")
    code, _, err = cli(capsys, "run", "--model", card, "--data", str(tmp_path / "big.csv"), "--out", whole, "--quiet")
    assert code == 0, err
    t = results.read_table(whole)
    assert t.schema.field("serial").type == pa.string()
    assert t.column("serial").to_pylist() == ["0", str(big + 1), "2", str(big + 3)]
    code, out, err = cli(capsys, "shard", str(tmp_path / "big.csv"), "--shards", "2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    parts = []
    for k, uri in enumerate(json.loads(out)):
        parts.append(str(tmp_path / f"p{k}.parquet"))
        assert cli(capsys, "run", "--model", card, "--data", uri, "--out", parts[-1], "--quiet")[0] == 0
    assert cli(capsys, "merge", *parts, "--out", merged, "--data", str(tmp_path / "big.csv"))[0] == 0
    assert_same_rows(whole, merged)
    # 'status' becomes meta_status, which the data has already: refused, naming both, before anything is written
    (tmp_path / "clash.csv").write_text(
        "image,mask,status,meta_status\n" + "".join(f"images/{i:03d}.png,masks/{i:03d}.png,a,b\n" for i in range(4)))
    out_uri = tmp_path / "clash.parquet"
    code, _, err = cli(capsys, "run", "--model", card, "--data", str(tmp_path / "clash.csv"), "--out", str(out_uri),
                       "--checkpoint-rows", "1", "--quiet")
    assert code == 2 and "'status' and 'meta_status'" in err and "rename" in err, err
    assert not out_uri.exists() and not (tmp_path / "clash.parquet.parts").exists()
    code, _, err = cli(capsys, "shard", str(tmp_path / "clash.csv"), "--shards", "2", "--out", str(tmp_path / "c"))
    assert code == 2 and "'meta_status'" in err and not (tmp_path / "c").exists(), err


def test_merge_keeps_manifest_order_whatever_the_row_column_says(tmp_path, capsys, zoo_path):
    card = tiny_card(tmp_path)
    make_set(tmp_path, n=6)
    numbers = [4, 2, 0, 5, 1, 3]  # the manifest's own row numbers: not its order
    (tmp_path / "m.csv").write_text("row,image,mask\n" + "".join(
        f"{r},images/{i:03d}.png,masks/{i:03d}.png\n" for i, r in enumerate(numbers)))
    manifest = str(tmp_path / "m.csv")
    whole = str(tmp_path / "whole.parquet")
    assert cli(capsys, "run", "--model", card, "--data", manifest, "--out", whole, "--quiet")[0] == 0
    uris = plan(manifest, 3, str(tmp_path / "s"))
    parts = []
    for k, uri in enumerate(uris):
        parts.append(str(tmp_path / f"p{k}.parquet"))
        assert cli(capsys, "run", "--model", card, "--data", uri, "--out", parts[-1], "--quiet")[0] == 0
    want = results.read_table(whole, columns=["row", "image", "status"]).to_pylist()
    assert [r["row"] for r in want] == numbers  # a user's row column is the results' row, in manifest order
    for extra in (["--data", manifest], []):  # with the data, or the parts of one plan without it
        merged = str(tmp_path / f"merged{len(extra)}.parquet")
        code, _, err = cli(capsys, "merge", *reversed(parts), "--out", merged, *extra)
        assert code == 0, err
        assert results.read_table(merged, columns=["row", "image", "status"]).to_pylist() == want


@pytest.mark.parametrize("content", ["", "image,mask,label\n", "jsonl", "parquet", "prefix"])
def test_a_data_set_without_items_fails_the_plan_naming_it(tmp_path, capsys, content):
    from camgate.data.manifest import DataError
    from camgate.steps import plan_step

    if content == "prefix":
        (tmp_path / "set" / "images").mkdir(parents=True)
        data = str(tmp_path / "set")
    elif content == "parquet":
        import pyarrow.parquet as pq

        data = str(tmp_path / "m.parquet")
        pq.write_table(pa.table({"image": pa.array([], pa.string())}), data)
    else:
        data = str(tmp_path / ("m.jsonl" if content == "jsonl" else "m.csv"))
        open(data, "w").write("" if content == "jsonl" else content)
    with pytest.raises(DataError, match=re.escape(f"no items in data {data}")):
        plan_step(data, 3, str(tmp_path / "out"))
    code, out, err = cli(capsys, "shard", data, "--shards", "3", "--out", str(tmp_path / "out"))
    assert code == 2 and f"no items in data {data}" in err and not out, err
    assert not (tmp_path / "out").exists()
