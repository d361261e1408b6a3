"""The camgate KFP components: thin bodies over ``camgate.steps``.

Each body imports camgate inside the function (it runs in the component image, not here) and
calls one step function, by keyword. ``install_kfp_package=False`` and no ``packages_to_install``: the
image already holds camgate and kfp at matching versions, so a task never pip-installs at start-up.

Run settings (method, target, batch_size, ...) are defined in :mod:`camgate.settings`: their input
descriptions come from there (``@documented``). Their defaults are written out as literals because KFP
copies each function's source into its task; ``tests/test_settings.py`` holds them to the table.
"""

import os
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from .. import __version__
from ..settings import documented

DEFAULT_REGISTRY = "ghcr.io/camgate"
# Read at import (compile) time; the fixed default keeps the checked-in YAML reproducible.
REGISTRY = os.environ.get("CAMGATE_IMAGE_REGISTRY", "").strip().rstrip("/") or DEFAULT_REGISTRY
IMAGE = f"{REGISTRY}/camgate:{__version__}"

__all__ = ["IMAGE", "REGISTRY", "DEFAULT_REGISTRY", "COMPONENTS", "load_model", "compute_heatmaps",
           "analyze_invalid_activation", "plan_shards", "shard_worker", "merge_results", "champion_results", "gate",
           "promote", "layer_maps", "animate_layers", "road_faithfulness"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def load_model(model_card: str, model: Output[Model], device: str = "cpu"):
    """Validate a model card (weights, one dummy forward, target layer) and emit it resolved.

    Args:
        model_card: Model card URI (YAML/JSON, s3:// or local path).

    Returns:
        model: The resolved model card (JSON, weights as an absolute URI); metadata carries arch, classes, input preprocessing, target layer and weights sha256.
    """
    from camgate.steps import load_model_step

    model.metadata.update(load_model_step(model_card, model.path, device=device))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def compute_heatmaps(model: Input[Model], data: str, heatmaps: Output[Dataset], method: str = "gradcam",
                     target: str = "predicted", batch_size: int = 16, device: str = "auto",
                     checkpoint: str = "", static_mask: str = "", checkpoint_rows: int = 256,
                     budget: int = 1024, seed: int = 0, amp: str = "off", score_threshold: float = 0.5,
                     annotations: str = "", classes: str = ""):
    """Compute a CAM heatmap and the prediction for every image, or for every detection (no masks read; their URIs are kept).

    Args:
        model: Resolved model card from load_model.
        data: Manifest (csv/jsonl/parquet) or prefix holding images/ and masks/.

    Returns:
        heatmaps: Heatmaps Parquet (one row per data item, raw low-resolution maps, mask URIs).
    """
    from camgate.steps import heatmaps_step

    heatmaps.metadata.update(heatmaps_step(
        model.path, data, heatmaps.path, method=method, target=target, batch_size=batch_size, device=device,
        card_sha256=model.metadata.get("card_sha256", ""), checkpoint=checkpoint, static_mask=static_mask,
        checkpoint_rows=checkpoint_rows, budget=budget, seed=seed, amp=amp, score_threshold=score_threshold,
        annotations=annotations, classes=classes))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def analyze_invalid_activation(heatmaps: Input[Dataset], results: Output[Dataset], data: str = "",
                               static_mask: str = "", mask_marks_valid: bool = False, invalid_ids: str = "",
                               topk: float = 0.1, export_uri: str = ""):
    """Measure how much of each heatmap falls on invalid pixels.

    Args:
        heatmaps: Heatmaps Parquet from compute_heatmaps.
        data: A manifest to take masks from, paired with the heatmaps by row and image (a manifest that does not match is refused); '' = the masks recorded in the heatmaps file.
        export_uri: Also copy the results Parquet here (s3:// or path); '' = do not.

    Returns:
        results: Results Parquet (invalid_activation_ratio and friends per image).
    """
    from camgate.steps import analyze_step

    results.metadata.update(analyze_step(heatmaps.path, results.path, data=data, static_mask=static_mask,
                                         mask_marks_valid=mask_marks_valid, invalid_ids=invalid_ids, topk=topk,
                                         export_uri=export_uri))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def champion_results(data: str, baseline: Output[Dataset], model_card: str = "", results_uri: str = "",
                     method: str = "gradcam", target: str = "predicted", batch_size: int = 16, static_mask: str = "",
                     mask_marks_valid: bool = False, invalid_ids: str = "", device: str = "auto",
                     checkpoint: str = "", budget: int = 1024, seed: int = 0, amp: str = "off",
                     score_threshold: float = 0.5, annotations: str = "", classes: str = ""):
    """The champion (production model) on the same data, for the gate's baseline rules; computed with the challenger's settings, so the ratios compare.

    Args:
        data: The challenger's manifest (csv/jsonl/parquet) or prefix.
        model_card: The champion's model card: its results are computed here with the settings below. '' = none.
        results_uri: Or the champion's results Parquet on this data, computed earlier. '' = none.

    Returns:
        baseline: The champion's results Parquet; with neither card nor results, an empty file the gate reads as 'no baseline'.
    """
    from camgate.steps import baseline_step

    baseline.metadata.update(baseline_step(
        baseline.path, data, model_card=model_card, results_uri=results_uri, method=method, target=target,
        batch_size=batch_size, static_mask=static_mask, mask_marks_valid=mask_marks_valid, invalid_ids=invalid_ids,
        device=device, checkpoint=checkpoint, budget=budget, seed=seed, amp=amp, score_threshold=score_threshold,
        annotations=annotations, classes=classes))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def plan_shards(data: str, shards: int, out_prefix: str, static_mask: str = "") -> List[str]:
    """Split a data set into shard manifests (contiguous rows, sizes within one; each keeps its full-manifest row).

    Args:
        data: Manifest (csv/jsonl/parquet) or prefix holding images/ and masks/.
        shards: Number of shards (more than items: one item each).
        out_prefix: Where shard-K-of-N.parquet are written (s3:// or path).

    Returns:
        The shard manifests' URIs, in row order.
    """
    from camgate.steps import plan_step

    return plan_step(data, shards, out_prefix, static_mask=static_mask)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def shard_worker(model: Input[Model], shard: str, method: str = "gradcam", target: str = "predicted",
                 batch_size: int = 16, device: str = "auto", static_mask: str = "", mask_marks_valid: bool = False,
                 invalid_ids: str = "", topk: float = 0.1, budget: int = 1024, attempts: int = 3,
                 amp: str = "off", seed: int = 0, score_threshold: float = 0.5, annotations: str = "",
                 classes: str = "") -> str:
    """Heatmaps and invalid-pixel metrics of one shard, written beside its manifest with a completion marker.

    Args:
        model: Resolved model card from load_model.
        shard: A shard manifest from plan_shards.

    Returns:
        The shard's results part (<shard>.results.parquet); a shard whose part and marker exist for the same model, settings and content of its images and masks (sha256) is not computed again.
    """
    from camgate.steps import shard_step

    out = shard_step(model.path, shard, method=method, target=target, batch_size=batch_size, device=device,
                     static_mask=static_mask, mask_marks_valid=mask_marks_valid, invalid_ids=invalid_ids, topk=topk,
                     budget=budget, seed=seed, amp=amp, card_sha256=model.metadata.get("card_sha256", ""),
                     attempts=attempts, score_threshold=score_threshold, annotations=annotations, classes=classes)
    print(out)
    return out["part"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_results(parts: List[str], results: Output[Dataset], data: str = "", export_uri: str = ""):
    """Merge the shards' results into one results Parquet in manifest order, checking that every row is there once.

    Args:
        parts: The shard workers' results parts (any order).
        data: The full data set: the parts must cover its rows exactly, with the same images; '' = check only that rows 0..max are each there once.
        export_uri: Also copy the results Parquet here (s3:// or path); '' = do not.

    Returns:
        results: Results Parquet (invalid_activation_ratio and friends per image), as one run over the whole data set writes it.
    """
    from camgate.steps import merge_step

    results.metadata.update(merge_step(parts, results.path, data=data, export_uri=export_uri))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(results: Input[Dataset], policy: str, metrics: Output[Metrics], summary: Output[Markdown],
         report: Output[HTML], record: Output[Artifact], junit: Output[Artifact], fail_on_violation: bool = False,
         export_prefix: str = "", road: Input[Dataset] = None, baseline: Input[Dataset] = None) -> NamedTuple("Outputs", passed=bool, mean_invalid_activation_ratio=float, error_rate=float,
                         n_images=int):
    """Apply a policy to the results: pass/fail, metrics and a report.

    Args:
        results: Results Parquet from analyze_invalid_activation.
        policy: Policy YAML URI (s3:// or path).
        fail_on_violation: Fail the task (and the run) when the gate fails; otherwise report only.
        export_prefix: Also write decision.json, record.json, junit.xml, summary.md and report.html under this prefix (even on a hard fail).
        road: ROAD results from road_faithfulness, for the policy's faithfulness rule (the decision says whether the heatmaps are trusted).
        baseline: The champion's results on the same data, for the policy's baseline rules (paired by row and image).

    Returns:
        metrics: At most 30 scalars: decision, counts, mean and p95 ratio, ROAD and baseline figures, one margin per run-wide rule.
        summary: Markdown summary of the decision.
        report: Self-contained HTML report.
        record: The test record (record.json): hashes of model, data and policy, every rule, environment, the seven EU requirements, approval fields.
        junit: JUnit XML, one test case per rule and scope.
        passed: Whether every rule passed.
        mean_invalid_activation_ratio: Mean ratio over ok images (-1 when there is none).
        error_rate: Share of rows with status 'error'.
        n_images: Rows judged.
    """
    from collections import namedtuple

    from camgate.steps import gate_outputs, gate_step

    decision, _, scalars = gate_step(results.path, policy, fail_on_violation=fail_on_violation,
                                     export_prefix=export_prefix, summary_path=summary.path, report_path=report.path,
                                     road=road.path if road is not None else "",
                                     baseline=baseline.path if baseline is not None else "",
                                     record_path=record.path, junit_path=junit.path)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    out = gate_outputs(decision)
    return namedtuple("Outputs", list(out))(**out)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def layer_maps(model: Input[Model], data: str, layers_out: Output[Dataset], layers: str = "all",
               method: str = "gradcam", static_mask: str = "", batch_size: int = 8, device: str = "auto",
               target: str = "predicted"):
    """Every layer's CAM for every image in one forward and one backward pass per batch (CAManim).

    Args:
        model: Resolved model card from load_model.
        data: Manifest (csv/jsonl/parquet) or prefix holding images/ (and masks/).

    Returns:
        layers_out: Layers Parquet: one row per (image, layer) with the raw map and, with masks, the invalid activation ratio; skipped modules and their reasons in its metadata.
    """
    from camgate.steps import layers_step

    layers_out.metadata.update(layers_step(model.path, data, layers_out.path, layers=layers, method=method,
                                           target=target, static_mask=static_mask, batch_size=batch_size,
                                           device=device, card_sha256=model.metadata.get("card_sha256", "")))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def animate_layers(model: Input[Model], image: str, animation: Output[HTML], files: Output[Dataset],
                   mask: str = "", layers: str = "all", method: str = "gradcam", norm: str = "both",
                   fps: float = 8.0, device: str = "auto", target: str = "predicted"):
    """Animate one image's CAMs through every layer: where in the network the decision forms.

    Args:
        model: Resolved model card from load_model.
        image: Image URI (s3:// or path).
        mask: Its invalid-pixel mask, outlined on every frame; '' = none.

    Returns:
        animation: HTML page with the animation (or its contact sheet) and the per-layer invalid activation ratio.
        files: Folder with layers.mp4 (H.264), layers.gif, contact_sheet.png, layers.json and layers.parquet.
    """
    from camgate.steps import animate_step

    page = animate_step(model.path, image, files.path, mask=mask, layers=layers, method=method, target=target,
                        norm=norm, fps=fps, device=device)
    with open(animation.path, "w", encoding="utf-8") as f:
        f.write(page)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
@documented
def road_faithfulness(model: Input[Model], data: str, road: Output[Dataset], metrics: Output[Metrics],
                      method: str = "gradcam", layers: str = "final", sample: int = 0, seed: int = 0,
                      device: str = "auto", target: str = "predicted", sanity: bool = False):
    """ROAD faithfulness of the heatmaps on a seeded sample: do they point at what the model uses?

    Args:
        model: Resolved model card from load_model.
        data: Manifest (csv/jsonl/parquet) or prefix holding images/.

    Returns:
        road: ROAD Parquet: per (image, layer) MoRF/LeRF curves, road and road_random (with sanity: the sanity checks' similarities); ybROAD summary in its metadata.
        metrics: Mean ROAD, mean ROAD of the random map, their margin (and ybROAD max/mean over layers; with sanity: the mean similarities).
    """
    from camgate.steps import road_step

    for name, value in road_step(model.path, data, road.path, method=method, layers=layers, sample=sample,
                                 seed=seed, target=target, device=device, sanity=sanity,
                                 card_sha256=model.metadata.get("card_sha256", "")).items():
        metrics.log_metric(name, float(value))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(model: Input[Model], passed: bool, record: Input[Artifact] = None, promote_to: str = "",
            registry_address: str = "", registry_port: int = 0, registry_author: str = "camgate"
            ) -> NamedTuple("Outputs", destination=str):
    """Copy a model that passed its gate, with its test record, to a promotion location; optionally register it.

    Args:
        model: Resolved model card from load_model.
        passed: The gate's verdict; False copies nothing.
        record: The gate's test record (record.json); needed to promote, and a record saying the gate failed copies nothing.
        promote_to: Promotion location (s3:// prefix or path): the model lands in <promote_to>/<name>/<weights sha256[:12]>/ with card.json, the weights, record.json and, written last, PROMOTED.json; '' = report only, copy nothing.
        registry_address: Kubeflow Model Registry to register the promoted weights in: host:port (plain HTTP) or http(s)://host[:port]; '' = do not register.
        registry_port: The registry's port when registry_address has none; 0 = 8080.
        registry_author: Author recorded in the Model Registry.

    Returns:
        destination: The promoted folder's URI; '' when nothing was copied.
    """
    from collections import namedtuple

    from camgate.steps import promote_step

    out = promote_step(model.path, passed, record=record.path if record is not None else "", promote_to=promote_to,
                       registry_address=registry_address, registry_port=registry_port,
                       registry_author=registry_author, card_sha256=model.metadata.get("card_sha256", ""))
    print(out["message"])
    return namedtuple("Outputs", ["destination"])(out["destination"] or "")


COMPONENTS = {c.name.replace("-", "_"): c for c in
              (load_model, compute_heatmaps, analyze_invalid_activation, plan_shards, shard_worker, merge_results,
               champion_results, gate, promote, layer_maps, animate_layers, road_faithfulness)}
