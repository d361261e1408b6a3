"""KFP components called as plain functions (``component.python_func``), and the compiled YAML."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")

from helpers import HERE, computed, make_set, tiny_card
from kfp import dsl  # noqa: E402

import camgate  # noqa: E402
from camgate.kfp import IMAGE, analyze_invalid_activation, compute_heatmaps, gate, load_model, promote  # noqa: E402
from camgate.kfp.compile import compile_all  # noqa: E402
from camgate.steps import GateFailed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPONENT_NAMES = ["load_model", "compute_heatmaps", "analyze_invalid_activation", "plan_shards", "shard_worker",
                   "merge_results", "champion_results", "gate", "promote", "layer_maps", "animate_layers",
                   "road_faithfulness"]




def policy(folder: Path, name: str, max_ratio: float) -> str:
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "rules": {"mean_invalid_activation_ratio": {"max": max_ratio},
                                                          "peak_in_invalid_rate": {"max": max_ratio}}}))
    return str(p)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """load_model -> compute_heatmaps -> analyze once; tests reuse the artifacts."""
    root = tmp_path_factory.mktemp("chain")
    _, manifest = make_set(root, n=6)
    card = tiny_card(root)
    model = dsl.Model(uri=str(root / "a" / "model"))
    (root / "a").mkdir()
    load_model.python_func(model_card=str(card), model=model)
    heat = dsl.Dataset(uri=str(root / "a" / "heatmaps"))
    compute_heatmaps.python_func(model=model, data=manifest, heatmaps=heat, batch_size=4, device="cpu")
    results = dsl.Dataset(uri=str(root / "a" / "results"))
    analyze_invalid_activation.python_func(heatmaps=heat, results=results, data=manifest,
                                           export_uri=str(root / "export") + "//results.parquet")
    return {"root": root, "card": card, "manifest": manifest, "model": model, "heatmaps": heat, "results": results}


def gate_artifacts(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    return dict(metrics=dsl.Metrics(uri=str(folder / "metrics")), summary=dsl.Markdown(uri=str(folder / "summary")),
                report=dsl.HTML(uri=str(folder / "report")), record=dsl.Artifact(uri=str(folder / "record")),
                junit=dsl.Artifact(uri=str(folder / "junit")))


# --------------------------------------------------------------------------- components


def test_load_model_writes_resolved_card_and_metadata(chain):
    card = json.loads(Path(chain["model"].path).read_text())
    weights = chain["root"] / "models" / "w.safetensors"
    assert card["weights"] == str(weights) and os.path.isabs(card["weights"])
    assert card["target_layer"] == ["features.2"]  # default resolved: the last conv
    md = chain["model"].metadata
    assert md["arch"] == "zoo:tiny_cnn" and md["classes"] == ["a", "b", "c"]
    assert md["input"]["size"] == [32, 32] and md["target_layer"] == ["features.2"]
    assert md["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert md["card_sha256"] == hashlib.sha256(chain["card"].read_bytes()).hexdigest()
    # the resolved card is itself a valid card, usable with `camgate run --model`
    from camgate.model.load import load_model as load

    assert load(chain["model"].path, device="cpu").weights_sha256 == md["weights_sha256"]


def test_load_model_relative_card_path_gives_absolute_weights(tmp_path, monkeypatch):
    tiny_card(tmp_path / "set")
    monkeypatch.chdir(tmp_path)
    model = dsl.Model(uri=str(tmp_path / "model"))
    load_model.python_func(model_card="set/card.yaml", model=model)
    assert json.loads(Path(model.path).read_text())["weights"] == str(tmp_path / "set" / "models" / "w.safetensors")


def test_load_model_fails_fast_on_a_bad_card(tmp_path):
    from camgate.errors import ModelCardError

    card = tiny_card(tmp_path, target_layer="features.9")
    with pytest.raises(ModelCardError, match="features.9"):
        load_model.python_func(model_card=str(card), model=dsl.Model(uri=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_heatmaps_and_analyze(chain):
    from camgate.io import results

    h = results.read_table(chain["heatmaps"].path)
    assert h.num_rows == 6 and h.column("invalid_activation_ratio").null_count == 6
    md = chain["heatmaps"].metadata
    assert md["rows"] == 6 and md["device"] == "cpu" and md["method"] == "gradcam"
    # provenance points at the user's card, not at the resolved copy
    assert results.run_metadata(h)["model_card_sha256"] == chain["model"].metadata["card_sha256"]
    r = results.read_table(chain["results"].path)
    assert r.column("status").to_pylist() == ["ok"] * 6
    assert all(0 <= v <= 1 for v in r.column("invalid_activation_ratio").to_pylist())
    # exported copy, with the doubled slash of prefix + '/results.parquet' folded
    exported = chain["root"] / "export" / "results.parquet"
    assert exported.read_bytes() == Path(chain["results"].path).read_bytes()
    assert chain["results"].metadata["exported"] == str(exported)


def test_analyze_rejects_bad_invalid_ids(chain, tmp_path):
    with pytest.raises(ValueError, match="invalid_ids"):
        analyze_invalid_activation.python_func(heatmaps=chain["heatmaps"], results=dsl.Dataset(uri=str(tmp_path / "r")),
                                               data=chain["manifest"], invalid_ids="1,x")


def test_gate_pass(chain, tmp_path):
    arts = gate_artifacts(tmp_path)
    out = gate.python_func(results=chain["results"], policy=policy(tmp_path, "loose", 1.0),
                           fail_on_violation=True, **arts)
    assert out.passed is True and out.n_images == 6 and out.error_rate == 0.0
    assert 0 <= out.mean_invalid_activation_ratio <= 1
    m = arts["metrics"].metadata
    assert m["passed"] == 1.0 and m["n_images"] == 6.0
    assert m["mean_invalid_activation_ratio"] == pytest.approx(out.mean_invalid_activation_ratio)
    assert "PASS" in Path(arts["summary"].path).read_text()
    assert Path(arts["report"].path).read_text().startswith("<!DOCTYPE html>")


def test_gate_soft_fail_reports_and_exports(chain, tmp_path):
    arts = gate_artifacts(tmp_path / "a")
    out = gate.python_func(results=chain["results"], policy=policy(tmp_path, "strict", 0.0),
                           export_prefix=str(tmp_path / "exp"), **arts)
    assert out.passed is False
    assert arts["metrics"].metadata["n_rules_failed"] >= 1
    assert "FAIL" in Path(arts["summary"].path).read_text()
    decision = json.loads((tmp_path / "exp" / "decision.json").read_text())
    assert decision["passed"] is False and decision["policy"] == "strict"
    assert (tmp_path / "exp" / "summary.md").read_text() == Path(arts["summary"].path).read_text()
    assert (tmp_path / "exp" / "report.html").read_text() == Path(arts["report"].path).read_text()
    # the record and JUnit go out too, and the report names the record by its hash
    record = (tmp_path / "exp" / "record.json").read_bytes()
    assert record == Path(arts["record"].path).read_bytes() and json.loads(record)["verdict"]["passed"] is False
    assert hashlib.sha256(record).hexdigest() in Path(arts["report"].path).read_text()
    assert b"<failure" in (tmp_path / "exp" / "junit.xml").read_bytes()


def test_gate_hard_fail_raises_with_rules_and_still_exports(chain, tmp_path):
    arts = gate_artifacts(tmp_path / "a")
    with pytest.raises(GateFailed) as info:
        gate.python_func(results=chain["results"], policy=policy(tmp_path, "strict", 0.0),
                         fail_on_violation=True, export_prefix=str(tmp_path / "exp"), **arts)
    msg = str(info.value)
    assert "policy 'strict'" in msg and "mean_invalid_activation_ratio @ all" in msg and "limit <= 0" in msg
    assert "mean_invalid_activation_ratio" in info.value.failed
    assert json.loads((tmp_path / "exp" / "decision.json").read_text())["passed"] is False


def test_gate_bad_policy_is_a_clear_error(chain, tmp_path):
    from camgate.gating.policy import PolicyError

    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: {mean_ratio: 0.3}\n")
    with pytest.raises(PolicyError, match="mean_ratio"):
        gate.python_func(results=chain["results"], policy=str(bad), **gate_artifacts(tmp_path))


def test_promote_prints_what_it_would_promote(chain, capsys):
    promote.python_func(model=chain["model"], passed=True)
    out = capsys.readouterr().out
    assert "would promote model 'tiny'" in out and chain["model"].metadata["weights_sha256"] in out


# --------------------------------------------------------------------------- image + compiled YAML


def test_image_tag_is_the_package_version():
    assert IMAGE.endswith(f"/camgate:{camgate.__version__}")
    for name in COMPONENT_NAMES:
        spec = yaml.safe_load((ROOT / "components" / f"{name}.yaml").read_text())
        (executor,) = spec["deploymentSpec"]["executors"].values()
        assert executor["container"]["image"] == IMAGE
        # nothing is pip-installed when a task starts: the image carries camgate and kfp
        assert "pip install" not in json.dumps(executor)


def test_registry_comes_from_the_environment():
    env = {**os.environ, "CAMGATE_IMAGE_REGISTRY": "registry.example/team/"}
    out = subprocess.run([sys.executable, "-c", "from camgate.kfp.components import IMAGE; print(IMAGE)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"registry.example/team/camgate:{camgate.__version__}"


def test_compiled_yaml_is_not_stale(tmp_path):
    if os.environ.get("CAMGATE_IMAGE_REGISTRY"):
        pytest.skip("CAMGATE_IMAGE_REGISTRY is set; the checked-in YAML uses the default registry")
    written = compile_all(str(tmp_path))
    rel = sorted(str(Path(p).relative_to(tmp_path)) for p in written)
    assert rel == sorted([f"components/{n}.yaml" for n in COMPONENT_NAMES]
                         + ["components/README.md", "pipelines/heatmap_gate.yaml"])
    stale = [r for r in rel if not (ROOT / r).exists() or (ROOT / r).read_bytes() != (tmp_path / r).read_bytes()]
    assert not stale, f"compiled YAML is stale: {stale}; run `camgate compile` and commit the result"
    extra = sorted(p.name for p in (ROOT / "components").glob("*.yaml")) != sorted(f"{n}.yaml" for n in COMPONENT_NAMES)
    assert not extra, "components/ holds YAML for a component that no longer exists; run `camgate compile`"


def test_compile_is_deterministic(tmp_path):
    a, b = compile_all(str(tmp_path / "a")), compile_all(str(tmp_path / "b"))
    for pa_, pb_ in zip(a, b):
        assert Path(pa_).read_bytes() == Path(pb_).read_bytes()


def test_compiled_pipeline_has_gpu_secret_env_and_no_credentials(tmp_path, monkeypatch):
    key_id, secret = "AKIATESTKEYID0000001", "test-secret-value-9f8e7d6c5b4a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    compile_all(str(tmp_path))
    for path in list(tmp_path.rglob("*.yaml")) + list((ROOT / "pipelines").glob("*.yaml")):
        text = path.read_text()
        assert key_id not in text and secret not in text, path
    # two documents: the pipeline spec, then the platform (Kubernetes) spec
    spec, platform = yaml.safe_load_all((ROOT / "pipelines" / "heatmap_gate.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    gpu = ("exec-shard-worker", "exec-road-faithfulness", "exec-champion-results")  # the tasks that run models
    for name in gpu:
        acc = executors[name]["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
    assert not any("accelerator" in e["container"].get("resources", {}) for k, e in executors.items()
                   if k not in gpu)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)  # every task, promote inside the condition included
    for name, cfg in k8s.items():
        (sec,) = cfg["secretAsEnv"]
        assert {m["envVar"] for m in sec["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        # the Secret's name is a run parameter, not baked into the YAML
        assert sec["secretNameParameter"]["componentInputParameter"].endswith("s3_secret"), name
        (cm,) = cfg["configMapAsEnv"]
        assert {m["envVar"] for m in cm["keyToEnv"]} == {"AWS_ENDPOINT_URL", "AWS_REGION"}
        assert cm["configMapNameParameter"]["componentInputParameter"].endswith("s3_config"), name
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["s3_secret"]["defaultValue"] == "camgate-s3" and params["s3_config"]["defaultValue"] == "camgate-s3"
    assert not [p for p in params if "key" in p.lower() or "password" in p.lower()]


def test_heatmaps_task_killed_and_restarted_resumes_from_its_checkpoint_on_s3(s3_bucket, tmp_path, monkeypatch):
    """A pod restart: the task dies, a new pod (new local output path) runs it again and resumes from
    the rows committed under the run's output prefix, computing only the rest."""
    import signal
    import time

    from camgate.io import storage

    _, manifest = make_set(tmp_path, n=24)
    card = tmp_path / "count.yaml"
    card.write_text(yaml.safe_dump({"name": "c", "arch": "zoo:counting_net", "num_classes": 3,
                                    "input": {"size": [32, 32]}}))
    model = dsl.Model(uri=str(tmp_path / "model"))
    load_model.python_func(model_card=str(card), model=model)
    (tmp_path / "model.json").write_text(json.dumps(model.metadata))
    ckpt = storage.join(s3_bucket, "runs", "r1", "checkpoints", "heatmaps")
    task = ("import json, sys\nfrom kfp import dsl\nfrom camgate.kfp import compute_heatmaps\n"
            f"m = dsl.Model(uri={str(tmp_path / 'model')!r})\n"
            f"m.metadata = json.load(open({str(tmp_path / 'model.json')!r}))\n"
            "compute_heatmaps.python_func(model=m, data=sys.argv[1], heatmaps=dsl.Dataset(uri=sys.argv[2]), "
            f"batch_size=2, checkpoint={ckpt!r}, checkpoint_rows=2, device='cpu')\n")
    env = dict(os.environ, PYTHONPATH=HERE, CAMGATE_TEST_COUNT=str(tmp_path / "first.count"))
    proc = subprocess.Popen([sys.executable, "-c", task, manifest, str(tmp_path / "pod1" / "heatmaps")], env=env)
    parts = lambda: [u for u in storage.list_uris(ckpt) if "part-" in u]  # noqa: E731
    end = time.time() + 180
    while len(parts()) < 3 and time.time() < end and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = 2 * len(parts())
    assert 6 <= done < 24

    monkeypatch.setenv("PYTHONPATH", HERE)
    monkeypatch.setenv("CAMGATE_TEST_COUNT", str(tmp_path / "second.count"))
    heat = dsl.Dataset(uri=str(tmp_path / "pod2" / "heatmaps"))
    (tmp_path / "pod2").mkdir()
    compute_heatmaps.python_func(model=model, data=manifest, heatmaps=heat, batch_size=2, checkpoint=ckpt,
                                 checkpoint_rows=2, device="cpu")
    assert heat.metadata["resumed"] == done and heat.metadata["computed"] == 24 - done
    assert computed(tmp_path / "second.count") == 24 - done
    from camgate.io import results

    assert results.read_table(heat.path).column("row").to_pylist() == list(range(24))
    assert parts() == []  # merged and removed


def test_layer_maps_animate_and_road_components(chain, tmp_path):
    from camgate.io import results
    from camgate.kfp import animate_layers, layer_maps, road_faithfulness

    lay = dsl.Dataset(uri=str(tmp_path / "layers"))
    layer_maps.python_func(model=chain["model"], data=chain["manifest"], layers_out=lay, batch_size=4, device="cpu")
    t = results.read_table(lay.path)
    assert t.num_rows == 6 * 4 and lay.metadata["rows"] == 24
    page, files = dsl.HTML(uri=str(tmp_path / "anim.html")), dsl.Dataset(uri=str(tmp_path / "anim"))
    animate_layers.python_func(model=chain["model"], image=str(chain["root"] / "images" / "000.png"),
                               mask=str(chain["root"] / "masks" / "000.png"), animation=page, files=files,
                               device="cpu", fps=4.0)
    html = Path(page.path).read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/gif;base64," in html and "features.2" in html
    assert (Path(files.path) / "layers.mp4").stat().st_size > 0
    road, m = dsl.Dataset(uri=str(tmp_path / "road")), dsl.Metrics(uri=str(tmp_path / "m"))
    road_faithfulness.python_func(model=chain["model"], data=chain["manifest"], road=road, metrics=m, sample=3,
                                  device="cpu")
    assert results.read_table(road.path).num_rows == 3 and m.metadata["road_images"] == 3.0
    assert "faithfulness_margin" in m.metadata
    off, m0 = dsl.Dataset(uri=str(tmp_path / "off")), dsl.Metrics(uri=str(tmp_path / "m0"))
    road_faithfulness.python_func(model=chain["model"], data=chain["manifest"], road=off, metrics=m0)  # sample 0
    assert results.read_table(off.path).num_rows == 0 and m0.metadata == {"road_images": 0.0}


def compiled_pipeline() -> tuple[dict, dict]:
    """The checked-in heatmap-gate pipeline: (pipeline spec, Kubernetes platform spec)."""
    spec, platform = yaml.safe_load_all((ROOT / "pipelines" / "heatmap_gate.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_task_requests_cpu_and_memory_promote_included():
    spec, _ = compiled_pipeline()
    executors = spec["deploymentSpec"]["executors"]
    res = executors["exec-promote"]["container"]["resources"]
    assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == ("1", "4Gi")
    best_effort = [k for k, e in executors.items()
                   if not {"resourceCpuRequest", "resourceMemoryRequest"} <= set(e["container"].get("resources", {}))]
    assert not best_effort, f"tasks without CPU and memory requests (BestEffort pods): {best_effort}"


# SecretAsEnv and ConfigMapAsEnv as the KFP 2.14 backend knows them (kubernetes_executor_config.proto at
# 2.14.0); 2.15 added `optional`, which 2.14 refuses as an unknown field
KFP_2_14_FIELDS = {"secretAsEnv": {"secretName", "keyToEnv", "secretNameParameter"},
                   "configMapAsEnv": {"configMapName", "keyToEnv", "configMapNameParameter"}}


def test_platform_spec_holds_only_fields_the_kfp_2_14_backend_knows():
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    _, k8s = compiled_pipeline()
    for name, cfg in k8s.items():
        for key, known in KFP_2_14_FIELDS.items():
            for entry in cfg[key]:
                assert set(entry) <= known, (name, key, set(entry) - known)
        # and it is still what kfp-kubernetes means: absent `optional` is false (the Secret must exist)
        msg = json_format.ParseDict(cfg, pb.KubernetesExecutorConfig())
        assert not any(e.optional for e in msg.secret_as_env) and not any(e.optional for e in msg.config_map_as_env)
