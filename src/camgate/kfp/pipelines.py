"""The ``heatmap-gate`` pipeline and a local runner for it (kfp.local, no cluster).

load_model -> plan_shards -> shard_worker per shard (GPU, in a ParallelFor) -> merge_results -> gate ->
promote (if passed); beside them road_faithfulness (ROAD on a sample) and champion_results (the
production model on the same data). One shard is the same path with one loop iteration, so a run's
results do not depend on the shard count.
S3 credentials come from a Kubernetes Secret and the endpoint from a ConfigMap, both named by
pipeline parameters, so neither ever appears in parameters or in the compiled YAML.
"""
import builtins
import contextlib
import importlib.util
import io
import os
import re
import sys
import warnings
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Input, Markdown, Model

from ..settings import documented
from .components import (champion_results, gate, load_model, merge_results, plan_shards, promote, road_faithfulness,
                         shard_worker)

__all__ = ["heatmap_gate", "heatmap_gate_pipeline", "DEFAULT_PARALLELISM", "promote_if_passed", "local_run",
           "PipelineFailed"]

# Shards computed at once. KFP fixes a ParallelFor's parallelism at compile time (it takes no
# pipeline parameter): `camgate compile --parallelism N` sets it, 0 = no limit.
DEFAULT_PARALLELISM = 8

SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CONFIG_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")


def _s3_env(task: dsl.PipelineTask, s3_secret, s3_config) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env={k: k for k in SECRET_KEYS})
    kubernetes.use_config_map_as_env(task, config_map_name=s3_config,
                                     config_map_key_to_env={k: k for k in CONFIG_KEYS})
    # kfp-kubernetes writes `optional: false`, a field the KFP 2.14 backend does not know ('unknown field
    # "optional"'); absent means the same (the Secret and ConfigMap must exist) to 2.15 and later
    for key in ("secretAsEnv", "configMapAsEnv"):
        for entry in task.platform_config.get("kubernetes", {}).get(key, []):
            if entry.get("optional") is False:
                del entry["optional"]
    # Inputs are URIs whose content can change under the same name (new weights, new data):
    # a cache hit would gate yesterday's model.
    return task.set_caching_options(False)


@dsl.pipeline(name="promote-if-passed", description="Run the promotion step when the gate passed.")
def promote_if_passed(model: Input[Model], passed: bool, record: Input[Artifact], promote_to: str = "",
                      registry_address: str = "", s3_secret: str = "camgate-s3", s3_config: str = "camgate-s3"):
    # A sub-pipeline so the condition reads one of its own inputs: kfp.local cannot evaluate a
    # condition on a multi-output task's output (it resolves only single 'Output' values), while a
    # parent input works everywhere, on the cluster as locally.
    with dsl.If(passed == True, name="gate-passed"):  # noqa: E712 - compiled to a CEL comparison
        promoted = promote(model=model, passed=passed, record=record, promote_to=promote_to,
                           registry_address=registry_address)
        # loads the model once for the check and copies the weights: what load_model asks for, not BestEffort
        promoted.set_cpu_request("1").set_memory_request("4Gi")
        _s3_env(promoted, s3_secret, s3_config)


def heatmap_gate_pipeline(parallelism: int = DEFAULT_PARALLELISM):
    """The heatmap-gate pipeline with at most ``parallelism`` shards computed at once (0 = no limit)."""
    if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 0:
        from ..errors import ConfigError

        raise ConfigError(f"parallelism must be an integer >= 0 (0 = no limit), got {parallelism!r}")

    @dsl.pipeline(name="heatmap-gate",
                  description="Heatmap test gate: CAMs of a vision model on a data set with invalid-pixel masks, "
                              "judged by a policy; promotes the model only when the gate passes.")
    @documented
    def heatmap_gate(model_card: str, data: str, policy: str, output_prefix: str, static_mask: str = "",
                     method: str = "gradcam", batch_size: int = 16, target: str = "predicted",
                     mask_marks_valid: bool = False, fail_on_violation: bool = False, road_sample: int = 0,
                     sanity: bool = False, shards: int = 1, amp: str = "off", seed: int = 0, budget: int = 1024,
                     score_threshold: float = 0.5, annotations: str = "", classes: str = "", baseline_model_card: str = "", baseline_results: str = "",
                     promote_to: str = "", registry_address: str = "", s3_secret: str = "camgate-s3",
                     s3_config: str = "camgate-s3",
                     ) -> NamedTuple("Outputs", passed=bool, mean_invalid_activation_ratio=float, error_rate=float,
                                     n_images=int, summary=Markdown, report=HTML):
        """Heatmap test gate (run settings: see camgate.settings).

        Args:
            model_card: Model card URI (YAML/JSON).
            data: Manifest (csv/jsonl/parquet) or prefix holding images/ and masks/.
            policy: Policy YAML URI.
            output_prefix: Where results.parquet, decision.json, record.json, junit.xml, summary.md and report.html are exported, and the shards' manifests, results parts and completion markers kept (shards/).
            fail_on_violation: Fail the run when the gate fails (hard gate); otherwise the run succeeds and promote is skipped.
            road_sample: Score the heatmaps' ROAD faithfulness on a seeded sample of this many images and hand it to the gate (the policy's faithfulness rule); 0 = off (the task then only writes an empty ROAD file).
            shards: Split the data set into this many shards, each computed by its own GPU task (tens to a few hundred; at most the compiled parallelism run at once); the results equal one shard's.
            baseline_model_card: The champion (production model) card: its results on the same data are computed in this run for the policy's baseline rules; '' = none.
            baseline_results: Or the champion's results Parquet on the same data, computed earlier; '' = none (the baseline rules are then skipped).
            promote_to: Where a model that passed is promoted (s3:// prefix or path): card, weights and test record, atomically; '' = the promote step only says what it would promote.
            registry_address: Kubeflow Model Registry (host:port or http(s)://host[:port]) to register a promoted model in; '' = do not register.
            s3_secret: Kubernetes Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
            s3_config: Kubernetes ConfigMap with AWS_ENDPOINT_URL and AWS_REGION.
        """
        loaded = load_model(model_card=model_card)
        loaded.set_cpu_request("1").set_memory_request("4Gi")  # holds the weights once for the check
        # shard manifests, parts and markers live under the output prefix: a re-submitted run skips the
        # shards that finished and resumes the rows a killed worker committed
        planned = plan_shards(data=data, shards=shards, out_prefix=f"{output_prefix}/shards", static_mask=static_mask)
        planned.set_cpu_request("1").set_memory_request("2Gi")
        with dsl.ParallelFor(planned.output, parallelism=parallelism, name="shards") as shard:
            worker = shard_worker(model=loaded.outputs["model"], shard=shard, method=method, target=target,
                                  batch_size=batch_size, static_mask=static_mask, mask_marks_valid=mask_marks_valid,
                                  amp=amp, seed=seed, budget=budget, score_threshold=score_threshold,
                                  annotations=annotations, classes=classes)
            worker.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            # decoding threads + a pinned-memory batch queue beside the GPU
            worker.set_cpu_request("4").set_memory_request("16Gi").set_memory_limit("32Gi")
        # part URIs, not artifacts: collected artifacts lose all but one per name; the merge checks itself
        # that the parts cover every row of the data set once
        merged = merge_results(parts=dsl.Collected(worker.output), data=data,
                               export_uri=f"{output_prefix}/results.parquet")
        merged.set_cpu_request("2").set_memory_request("8Gi")
        # Always a task, so the gate always has its input (kfp.local cannot pass an output out of a dsl.If);
        # with road_sample=0 it writes an empty file without loading the model. On the GPU: ROAD is
        # 36 forwards per image.
        faith = road_faithfulness(model=loaded.outputs["model"], data=data, method=method, target=target,
                                  sample=road_sample, seed=seed, sanity=sanity)
        faith.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        faith.set_cpu_request("2").set_memory_request("8Gi")
        # Always a task too (an empty 'no baseline' file when no champion is named); on the GPU when it computes.
        champion = champion_results(data=data, model_card=baseline_model_card, results_uri=baseline_results,
                                    method=method, target=target, batch_size=batch_size, static_mask=static_mask,
                                    mask_marks_valid=mask_marks_valid, amp=amp, seed=seed, budget=budget,
                                    score_threshold=score_threshold, annotations=annotations, classes=classes, checkpoint=f"{output_prefix}/checkpoints/baseline")
        champion.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        champion.set_cpu_request("4").set_memory_request("16Gi")
        verdict = gate(results=merged.outputs["results"], policy=policy, fail_on_violation=fail_on_violation,
                       export_prefix=output_prefix, road=faith.outputs["road"], baseline=champion.outputs["baseline"])
        verdict.set_cpu_request("1").set_memory_request("2Gi")
        for task in (loaded, planned, worker, merged, faith, champion, verdict):
            _s3_env(task, s3_secret, s3_config)
        promote_if_passed(model=loaded.outputs["model"], passed=verdict.outputs["passed"],
                          record=verdict.outputs["record"], promote_to=promote_to,
                          registry_address=registry_address, s3_secret=s3_secret, s3_config=s3_config)
        outputs = NamedTuple("Outputs", passed=bool, mean_invalid_activation_ratio=float, error_rate=float,
                             n_images=int, summary=Markdown, report=HTML)
        return outputs(verdict.outputs["passed"], verdict.outputs["mean_invalid_activation_ratio"],
                       verdict.outputs["error_rate"], verdict.outputs["n_images"], verdict.outputs["summary"],
                       verdict.outputs["report"])

    return heatmap_gate


heatmap_gate = heatmap_gate_pipeline()


# --------------------------------------------------------------------------- local runs


class PipelineFailed(RuntimeError):
    """A local run failed in a task other than a hard gate; the message names the task's error."""


class _Tee(io.TextIOBase):
    """Task logs reach us as prints on stdout: keep a copy to find the failing task's error, and hand
    the lines that say a task started or finished to ``progress``."""

    def __init__(self, out, echo: bool, progress=None):
        self.out, self.echo, self.parts, self.progress, self._line = out, echo, [], progress, ""

    def write(self, s: str) -> int:
        self.parts.append(s)
        if self.echo:
            self.out.write(s)
        if self.progress:
            *done, self._line = (self._line + s).split("\n")
            for line in done:
                # tasks of a ParallelFor print from threads: print() writes text and newline apart, so
                # two messages can share a line
                for m in _TASK_LINE.finditer(_ANSI.sub("", line)):
                    self.progress(m.group(0))
        return len(s)

    def flush(self) -> None:
        if self.echo:
            self.out.flush()

    def text(self) -> str:
        return "".join(self.parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours task names
_TASK_LINE = re.compile(r"(Executing task '[^']+'|Task '[^']+' finished with status (?:SUCCESS|FAILURE))")
_ERROR_LINE = re.compile(r"^\s*((?:[\w.]+\.)?(\w+(?:Error|Exception|Failed|NotFound|Denied))): (.+)$")


def _task_error(log: str) -> tuple[str, str] | None:
    """(exception class, message) of the last traceback line in the task logs."""
    found = None
    for line in log.splitlines():
        m = _ERROR_LINE.match(line)
        if m:
            found = (m.group(2), m.group(3).strip())
    return found


def _shadowed_docker_sdk() -> None:
    """Keep a ``docker/`` folder (this repository has one) from passing for the Docker SDK.

    On ``sys.path`` (the current directory under ``python -m``) such a folder imports as an empty
    namespace package; kfp.local then takes the SDK for installed and fails on ``docker.DockerClient``.
    Without the real SDK it must see an ImportError instead. An installed SDK (a regular package)
    always wins over a namespace folder and is left alone.
    """
    mod = sys.modules.get("docker", False)
    if mod is False:  # not imported yet
        spec = importlib.util.find_spec("docker")
        shadowed = (spec is not None and spec.origin in (None, "namespace")
                    and spec.submodule_search_locations is not None)
    else:
        shadowed = mod is not None and not hasattr(mod, "DockerClient")
    if shadowed:
        sys.modules["docker"] = None  # `import docker` -> ImportError


@contextlib.contextmanager
def _parallel_safe_logging():
    """Hold kfp.local's logging state for the whole run, and give the caller's back afterwards.

    kfp.local swaps the root logger's handlers and level, and ``builtins.print``, around each task, from
    every ParallelFor thread at once: a task that ends after its neighbour restores the state from
    before both, so its "finished" line was dropped, and the last one out left its own handler and
    indented print behind. Inside kfp.local's own logger context for the whole run, every swap restores
    a working state; its exit restores the caller's logging, and ``print`` is restored here.
    """
    from kfp.local import logging_utils

    old_print = builtins.print
    try:
        with logging_utils.local_logger_context():
            yield
    finally:
        builtins.print = old_print


@contextlib.contextmanager
def _child_env():
    # kfp.local starts each task with this interpreter; a task that shells out to `python3` or
    # `camgate` must find the same environment first on PATH
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def local_run(pipeline_args: dict, pipeline_root: str, package_path: str | None = None,
              echo: bool = True, progress=None) -> dict:
    """Run the heatmap-gate pipeline with ``kfp.local.SubprocessRunner(use_venv=False)``.

    ``package_path``: a compiled pipeline (``pipelines/heatmap_gate.yaml``) to run instead of the
    Python definition — what a cluster would run. Tasks inherit this process's environment
    (``AWS_*`` for S3); the Kubernetes Secret/ConfigMap and GPU settings are ignored locally.
    ``progress``: called with each "Executing task ..." / "Task ... finished with status ..." line.

    Returns the gate's outputs: ``passed``, ``mean_invalid_activation_ratio``, ``error_rate``,
    ``n_images``; the local paths ``summary`` (Markdown) and ``report`` (HTML); ``run_dir`` (the
    run's folder under ``pipeline_root``) and ``promoted`` (whether the promote task ran).
    Raises :class:`camgate.steps.GateFailed` when a hard gate fails, :class:`PipelineFailed` when
    another task fails.
    """
    _shadowed_docker_sdk()
    from kfp import local

    from ..steps import GateFailed

    if package_path:
        from kfp import components

        pipeline = components.load_component_from_file(os.fspath(package_path))
    else:
        pipeline = heatmap_gate
    os.makedirs(pipeline_root, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.fspath(pipeline_root),
               raise_on_error=True)
    tee = _Tee(sys.stdout, echo, progress)
    try:
        with _child_env(), contextlib.redirect_stdout(tee), _parallel_safe_logging(), warnings.catch_warnings():
            # expected locally: the image is not used and cluster-only settings are no-ops
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
            task = pipeline(**pipeline_args)
    except RuntimeError as e:
        err = _task_error(tee.text())
        if err and err[0] == GateFailed.__name__:
            raise GateFailed(err[1]) from None
        detail = f" {err[0]}: {err[1]}" if err else ""
        raise PipelineFailed(_ANSI.sub("", str(e)) + detail) from None
    out = task.outputs
    result = {k: out[k] for k in ("passed", "mean_invalid_activation_ratio", "error_rate", "n_images")}
    result.update(summary=out["summary"].path, report=out["report"].path)
    run_dir = os.path.dirname(os.path.dirname(result["summary"]))  # <root>/<run>/gate/summary
    result.update(run_dir=run_dir, promoted=os.path.isdir(os.path.join(run_dir, "promote")))
    return result
