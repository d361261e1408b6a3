"""The CLI, the steps, the components and the pipeline agree with the one table of run settings.

For every setting and every place the table names, the place has it with the table's default; and
every parameter of a place that is not a path, an artifact or a gate/promotion option must be a
setting naming that place, so an option added in one place only fails here.
"""
import argparse
import inspect
import json
import typing
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from camgate import cli, settings, steps
from camgate.kfp import components as kfp_components
from camgate.kfp.components import COMPONENTS
from camgate.kfp.pipelines import heatmap_gate
from camgate.metrics import invalid as analysis

ROOT = Path(__file__).resolve().parents[1]

# Parameters that are not run settings: what a place reads and writes, and the gate's own options.
NOT_SETTINGS = {
    # paths, URIs and artifacts
    "model", "model_card", "model_path", "data", "out", "out_path", "out_dir", "out_prefix", "heatmaps",
    "heatmaps_path", "results", "results_path", "results_uri", "image", "mask", "shard", "parts", "export_uri",
    "layers_out", "animation", "files", "road", "metrics", "baseline", "summary", "report", "record", "junit",
    "summary_path", "report_path", "record_path", "junit_path", "export_prefix",
    # how the work is split (the numbers do not depend on it), and provenance passed along
    "shards", "card_sha256",
    # the gate and the promotion, not the run
    "policy", "fail_on_violation", "passed", "promote_to", "registry_address", "registry_port", "registry_author",
    # CLI only: output and progress
    "heatmaps_only", "quiet", "plot", "layers_file", "help",
}
# pipeline inputs that are not (or not named as) run settings
PIPELINE_OWN = {"model_card", "data", "policy", "output_prefix", "fail_on_violation", "road_sample", "shards",
                "baseline_model_card", "baseline_results", "promote_to", "registry_address", "s3_secret", "s3_config"}

STEPS = {name: f for name, f in inspect.getmembers(steps, inspect.isfunction)
         if name.endswith("_step") and f.__module__ == steps.__name__}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices




def test_the_table_names_only_places_that_exist():
    verbs = _subparsers()
    for s in settings.SETTINGS.values():
        assert set(s.verbs) <= set(settings.VERBS) <= set(verbs), s.name
        assert set(s.steps) <= set(STEPS), (s.name, set(s.steps) - set(STEPS))
        assert set(s.components) <= set(COMPONENTS), (s.name, set(s.components) - set(COMPONENTS))
        assert set(s.at) <= set(s.places()) | {"heatmap_gate"}, (s.name, set(s.at) - set(s.places()))
        assert s.name not in NOT_SETTINGS


@pytest.mark.parametrize("verb", settings.VERBS)
def test_cli_verb_options_are_the_table(verb):
    options = {a.dest: a for a in _subparsers()[verb]._actions}
    for s in settings.SETTINGS.values():
        if verb not in s.verbs:
            assert s.name not in options, f"`camgate {verb}` has {s.flag}, which the table does not give it"
            continue
        assert s.name in options, f"`camgate {verb}` lacks {s.flag}"
        a = options[s.name]
        assert a.option_strings == [s.flag]
        want = settings.default(s.name, verb)
        assert a.default == (None if want == "" else want), (verb, s.name, a.default)
    stray = set(options) - set(settings.SETTINGS) - NOT_SETTINGS
    assert not stray, f"`camgate {verb}` options not in camgate.settings: {sorted(stray)}"


def test_cli_keeps_its_flags_and_parsing():
    p = cli.parser()
    base = ["--model", "c.yaml", "--data", "d.csv", "--out", "o.parquet"]
    a = p.parse_args(["run", *base, "--target-layer", "a", "--target-layer", "b", "--batch-size", "auto",
                      "--static-mask", "m.png", "--mask-marks-valid", "--topk", "0.2", "--seed", "3"])
    assert (a.target_layer, a.batch_size, a.static_mask, a.mask_marks_valid, a.topk, a.seed) == \
        (["a", "b"], "auto", "m.png", True, 0.2, 3)
    a = p.parse_args(["run", *base])
    assert (a.batch_size, a.budget, a.amp, a.checkpoint, a.invalid_ids, a.target_layer) == (16, 1024, "off", None,
                                                                                            None, None)
    assert p.parse_args(["layers", *base, "--batch-size", "4"]).batch_size == 4
    assert p.parse_args(["road", *base]).layers == "final" and p.parse_args(["layers", *base]).layers == "all"
    assert p.parse_args(["road", *base, "--percentiles", "10,50"]).percentiles == "10,50"
    assert p.parse_args(["animate", "--model", "c", "--image", "i", "--out", "o"]).fps == 8


def _library_functions():
    """The library's entry points, each with the verb whose defaults it shares."""
    import camgate
    from camgate import runner

    return {"run": (runner.run, "run"), "Runner": (runner.Runner.__init__, "run"),
            "run_layers": (runner.run_layers, "layers"), "run_road": (runner.run_road, "road"),
            "analyze": (runner.analyze, "analyze"), "explain": (camgate.explain, "run"),
            "evaluate": (camgate.evaluate, "run")}


@pytest.mark.parametrize("name", ["run", "Runner", "run_layers", "run_road", "analyze", "explain", "evaluate"])
def test_library_defaults_are_the_table(name):
    """The Python functions behind the verbs take each setting of their verb with the table's default:
    a default typed again by hand would drift."""
    fn, verb = _library_functions()[name]
    params = inspect.signature(fn).parameters
    checked = 0
    for s in settings.SETTINGS.values():
        if verb in s.verbs and s.name in params:
            want = settings.default(s.name, verb)
            have = params[s.name].default
            if want in ("", None):
                continue  # "not given" is None in Python
            assert have == want, (name, s.name, have, want)
            checked += 1
    assert checked >= 1, name


@pytest.mark.parametrize("name", sorted(STEPS))
def test_step_parameters_are_the_table(name):
    params = inspect.signature(STEPS[name]).parameters
    for s in settings.SETTINGS.values():
        if name not in s.steps:
            assert s.name not in params, f"{name} takes {s.name}, which the table does not give it"
            continue
        assert s.name in params, f"{name} lacks {s.name}"
        p = params[s.name]
        assert p.kind is p.KEYWORD_ONLY, f"{name}: {s.name} must be keyword-only"
        assert p.default == settings.default(s.name, name), (name, s.name, p.default)
        assert type(p.default) is type(settings.default(s.name, name)), (name, s.name)
    stray = set(params) - set(settings.SETTINGS) - NOT_SETTINGS
    assert not stray, f"{name} parameters not in camgate.settings: {sorted(stray)}"


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_inputs_are_the_table(name):
    comp = COMPONENTS[name]
    inputs = comp.component_spec.inputs or {}
    params = inspect.signature(comp.python_func).parameters
    for s in settings.SETTINGS.values():
        if name not in s.components:
            assert s.name not in inputs, f"component {name} takes {s.name}, which the table does not give it"
            continue
        assert s.name in inputs, f"component {name} lacks {s.name}"
        want = settings.default(s.name, name)
        assert inputs[s.name].default == want and params[s.name].default == want, (name, s.name)
        assert type(params[s.name].default) is type(want), (name, s.name)
        # the description comes from the table unless the docstring says more for this component
        assert inputs[s.name].description, (name, s.name)
    stray = set(inputs) - set(settings.SETTINGS) - NOT_SETTINGS
    assert not stray, f"component {name} inputs not in camgate.settings: {sorted(stray)}"


def test_compiled_components_show_the_table_defaults():
    for name in COMPONENTS:
        spec = yaml.safe_load((ROOT / "components" / f"{name}.yaml").read_text())
        params = spec["root"]["inputDefinitions"].get("parameters", {})
        for s in settings.SETTINGS.values():
            if name in s.components:
                assert params[s.name]["defaultValue"] == settings.default(s.name, name), (name, s.name)


def test_pipeline_inputs_are_the_table_and_reach_every_task():
    inputs = heatmap_gate.component_spec.inputs
    pipeline_settings = {s.name for s in settings.SETTINGS.values() if s.pipeline}
    for name in pipeline_settings:
        assert name in inputs and inputs[name].default == settings.default(name), name
    stray = set(inputs) - pipeline_settings - PIPELINE_OWN
    assert not stray, f"heatmap-gate inputs not in camgate.settings (or not marked pipeline=True): {sorted(stray)}"

    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "heatmap_gate.yaml").read_text()))
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    seen = set()
    for dag in dags:
        for task in dag["tasks"].values():
            comp = task["componentRef"]["name"].removeprefix("comp-").replace("-", "_")
            if comp not in COMPONENTS:
                continue
            seen.add(comp)
            wired = task.get("inputs", {}).get("parameters", {})
            for name in pipeline_settings:
                if comp in settings.get(name).components:
                    src = wired.get(name, {}).get("componentInputParameter", "")
                    assert src.endswith(name), f"the pipeline does not pass {name} to {comp}"
    assert {"shard_worker", "champion_results", "road_faithfulness"} <= seen


def test_topk_default_is_the_table():
    assert analysis.TOPK_DEFAULT == settings.default("topk")


def test_documented_fills_only_what_the_docstring_leaves_out():
    def f(model: str, method: str = "gradcam", seed: int = 0):
        """Do it.

        Args:
            model: The model.
            seed: Its own words.

        Returns:
            Nothing.
        """

    doc = settings.documented(f).__doc__
    assert "seed: Its own words." in doc and doc.count("seed:") == 1
    assert f"    method: {settings.help_text('method')}." in doc
    assert doc.index("method:") < doc.index("Returns:")


# --------------------------------------------------------------------------- forwarding


def _value(s: settings.Setting):
    """A value different from every default of the setting."""
    d = s.default
    if s.type is bool:
        return not d
    if s.type is int:
        return 7 + (d or 0)
    if s.type is float:
        return 0.25 + (d or 0)
    return f"x-{s.name}"


def _arguments(comp, tmp_path) -> dict:
    """Arguments for ``comp.python_func``: an artifact per artifact input/output, something per required
    parameter, and a non-default value for every run setting."""
    out = {}
    for name, p in inspect.signature(comp.python_func).parameters.items():
        base = typing.get_args(p.annotation)[:1]
        if base and isinstance(base[0], type) and issubclass(base[0], dsl.Artifact):
            out[name] = base[0](name=name, uri=str(tmp_path / name), metadata={})
            (tmp_path / name).touch()
        elif name in settings.SETTINGS:
            out[name] = _value(settings.get(name))
        elif p.default is inspect.Parameter.empty:
            out[name] = {int: 2, bool: True, str: f"x-{name}"}.get(p.annotation, [])
    return out


@pytest.mark.parametrize("name", sorted({c for s in settings.SETTINGS.values() for c in s.components}))
def test_components_pass_every_setting_to_their_step_by_name(name, monkeypatch, tmp_path):
    called = {}

    def record(*args, **kwargs):
        called.update(kwargs)
        return {"animate_layers": "", "plan_shards": [], "shard_worker": {"part": ""}}.get(name, {})

    comp = COMPONENTS[name]
    source = inspect.getsource(comp.python_func)
    (step,) = {n for n in STEPS if f"import {n}" in source}
    monkeypatch.setattr(steps, step, record)
    args = _arguments(comp, tmp_path)
    comp.python_func(**args)
    want = {n: v for n, v in args.items() if n in settings.SETTINGS}
    assert want and {n: called.get(n) for n in want} == want


def test_road_faithfulness_and_compute_heatmaps_forward_the_settings_that_drifted(monkeypatch, tmp_path):
    called = {}
    monkeypatch.setattr(steps, "road_step", lambda *a, **kw: called.setdefault("road", kw) and {})
    monkeypatch.setattr(steps, "heatmaps_step", lambda *a, **kw: called.setdefault("heat", kw) and {})
    model = dsl.Model(uri=str(tmp_path / "m"), metadata={"card_sha256": "abc"})
    kfp_components.road_faithfulness.python_func(model=model, data="d", road=dsl.Dataset(uri=str(tmp_path / "r")),
                                                 metrics=dsl.Metrics(uri=str(tmp_path / "x")), target="label",
                                                 sample=2)
    kfp_components.compute_heatmaps.python_func(model=model, data="d", heatmaps=dsl.Dataset(uri=str(tmp_path / "h")),
                                                amp="bf16", seed=5)
    assert called["road"]["target"] == "label" and called["road"]["sample"] == 2
    assert (called["heat"]["amp"], called["heat"]["seed"], called["heat"]["card_sha256"]) == ("bf16", 5, "abc")


class _Summary(dict):
    def to_dict(self):
        return dict(self)


class _Loaded:
    device = "cpu"


@pytest.fixture
def fake_models(monkeypatch):
    """Steps load no model and run nothing: the runner functions record what they were given."""
    from camgate import model as modelspec
    from camgate import runner
    from camgate.runner import shards

    class Card:
        sha256 = ""

        @staticmethod
        def load(path):
            return Card()

    calls = {}

    def recorder(key):
        def f(*args, **kwargs):
            calls[key] = kwargs
            return {"part": ""} if key == "run_shard" else _Summary()
        return f

    monkeypatch.setattr(modelspec, "ModelCard", Card)
    monkeypatch.setattr(modelspec, "load_model", lambda card, device="auto": _Loaded())
    for mod, fn in ((runner, "run"), (runner, "run_layers"), (runner, "run_road"), (shards, "run_shard")):
        monkeypatch.setattr(mod, fn, recorder(fn))
    return calls


def test_steps_pass_seed_budget_amp_and_target_to_the_runner(fake_models, monkeypatch, tmp_path):
    from camgate import gating as gate
    from camgate.io import results

    kw = dict(method="decam", target="label", budget=64, seed=9, amp="bf16")
    steps.heatmaps_step("card", "data", str(tmp_path / "h"), **kw)
    assert {k: fake_models["run"][k] for k in kw} == kw
    steps.shard_step("card", "shard", **kw)
    assert {k: fake_models["run_shard"][k] for k in kw} == kw
    steps.baseline_step(str(tmp_path / "b"), "data", model_card="card", **kw)
    assert {k: fake_models["run"][k] for k in kw} == kw
    monkeypatch.setattr(gate, "road_stats", lambda path: {})
    monkeypatch.setattr(results, "run_metadata", lambda path: {})
    steps.road_step("card", "data", str(tmp_path / "r"), sample=3, seed=4, target="label")
    assert (fake_models["run_road"]["seed"], fake_models["run_road"]["target"]) == (4, "label")
    steps.layers_step("card", "data", str(tmp_path / "l"), target="label")
    assert fake_models["run_layers"]["target"] == "label"


def test_the_table_is_json_describable():
    # every default is a plain value (it lands in compiled YAML and in the run's metadata)
    json.dumps({s.name: s.default for s in settings.SETTINGS.values()})
