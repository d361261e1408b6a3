"""The camgate KFP components: thin bodies over ``camgate.steps``.

Each body imports camgate inside the function (it runs in the component image, not here) and
calls one step function. ``install_kfp_package=False`` and no ``packages_to_install``: the image
already holds camgate and kfp at matching versions, so a task never pip-installs at start-up.
"""

import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from .. import __version__

DEFAULT_REGISTRY = "ghcr.io/camgate"
# Read at import (compile) time; the fixed default keeps the checked-in YAML reproducible.
REGISTRY = os.environ.get("CAMGATE_IMAGE_REGISTRY", "").strip().rstrip("/") or DEFAULT_REGISTRY
IMAGE = f"{REGISTRY}/camgate:{__version__}"

__all__ = ["IMAGE", "REGISTRY", "DEFAULT_REGISTRY", "COMPONENTS", "load_model", "compute_heatmaps",
           "analyze_invalid_activation", "gate", "promote"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def load_model(model_card: str, model: Output[Model], device: str = "cpu"):
    """Validate a model card (weights, one dummy forward, target layer) and emit it resolved.

    Args:
        model_card: Model card URI (YAML/JSON, s3:// or local path).
        device: Device for the validation forward pass (cpu | cuda | auto).

    Returns:
        model: The resolved model card (JSON, weights as an absolute URI); metadata carries arch, classes, input preprocessing, target layer and weights sha256.
    """
    from camgate.steps import load_model_step

    model.metadata.update(load_model_step(model_card, model.path, device))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compute_heatmaps(model: Input[Model], data: str, heatmaps: Output[Dataset], method: str = "gradcam",
                     target: str = "predicted", batch_size: int = 16, device: str = "auto",
                     checkpoint: str = "", static_mask: str = "", checkpoint_rows: int = 256):
    """Compute a CAM heatmap and the prediction for every image (no masks read; their URIs are kept).

    Args:
        model: Resolved model card from load_model.
        data: Manifest (csv/jsonl/parquet) or prefix holding images/ and masks/.
        method: CAM method (gradcam, gradcam++, layercam, ...).
        target: Class to explain: predicted | label | <class index>.
        batch_size: Images per forward/backward pass.
        device: auto | cpu | cuda[:N].
        checkpoint: Folder (s3:// or path) where rows are committed as they come; a restarted task resumes from it. '' = beside the output artifact (lost with the pod).
        static_mask: One mask for every image (fixed camera), recorded for the analysis; '' = per-image masks.
        checkpoint_rows: Commit rows every this many rows.

    Returns:
        heatmaps: Heatmaps Parquet (one row per data item, raw low-resolution maps, mask URIs).
    """
    from camgate.steps import heatmaps_step

    heatmaps.metadata.update(heatmaps_step(model.path, data, heatmaps.path, method, target, batch_size,
                                           device, model.metadata.get("card_sha256", ""), checkpoint,
                                           static_mask, checkpoint_rows))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def analyze_invalid_activation(heatmaps: Input[Dataset], results: Output[Dataset], data: str = "",
                               static_mask: str = "", mask_marks_valid: bool = False, invalid_ids: str = "",
                               topk: float = 0.1, export_uri: str = ""):
    """Measure how much of each heatmap falls on invalid pixels.

    Args:
        heatmaps: Heatmaps Parquet from compute_heatmaps.
        data: A manifest to take masks from, paired with the heatmaps by row and image (a manifest that does not match is refused); '' = the masks recorded in the heatmaps file.
        static_mask: One mask for every image (fixed camera); overrides per-image masks.
        mask_marks_valid: Masks mark the VALID region instead of the invalid one.
        invalid_ids: Label-map masks: comma-separated invalid label ids ('' = any non-zero pixel is invalid).
        topk: Fraction of hottest pixels for topk_invalid_share.
        export_uri: Also copy the results Parquet here (s3:// or path); '' = do not.

    Returns:
        results: Results Parquet (invalid_activation_ratio and friends per image).
    """
    from camgate.steps import analyze_step

    results.metadata.update(analyze_step(heatmaps.path, results.path, data, static_mask, mask_marks_valid,
                                         invalid_ids, topk, export_uri))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(results: Input[Dataset], policy: str, metrics: Output[Metrics], summary: Output[Markdown],
         report: Output[HTML], fail_on_violation: bool = False, export_prefix: str = "",
         ) -> NamedTuple("Outputs", passed=bool, mean_invalid_activation_ratio=float, error_rate=float,
                         n_images=int):
    """Apply a policy to the results: pass/fail, metrics and a report.

    Args:
        results: Results Parquet from analyze_invalid_activation.
        policy: Policy YAML URI (s3:// or path).
        fail_on_violation: Fail the task (and the run) when the gate fails; otherwise report only.
        export_prefix: Also write decision.json, summary.md and report.html under this prefix (even on a hard fail).

    Returns:
        metrics: Every scalar of the decision (counts, rates, means).
        summary: Markdown summary of the decision.
        report: Self-contained HTML report.
        passed: Whether every rule passed.
        mean_invalid_activation_ratio: Mean ratio over ok images (-1 when there is none).
        error_rate: Share of rows with status 'error'.
        n_images: Rows judged.
    """
    from collections import namedtuple

    from camgate.steps import gate_outputs, gate_step

    decision, _, _, scalars = gate_step(results.path, policy, fail_on_violation, export_prefix,
                                        summary.path, report.path)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    out = gate_outputs(decision)
    return namedtuple("Outputs", list(out))(**out)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(model: Input[Model], passed: bool):
    """Placeholder promotion step: prints what it would promote. Replace it with your own.

    Args:
        model: Resolved model card from load_model.
        passed: The gate's verdict.
    """
    from camgate.steps import promote_step

    print(promote_step(model.path, dict(model.metadata), passed))


COMPONENTS = {c.name.replace("-", "_"): c for c in
              (load_model, compute_heatmaps, analyze_invalid_activation, gate, promote)}
