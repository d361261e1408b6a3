"""One function per pipeline step: what each KFP component body calls.

Everything a component does lives here, so it runs (and is tested) without kfp: the component
bodies in ``camgate.kfp.components`` only pass paths and parameters through (by keyword) and copy
the return values onto their output artifacts. Run settings are keyword-only, with the defaults of
:mod:`camgate.settings`.
"""
from __future__ import annotations

import json
import math
import re

from . import report
from .data.decode import MaskSpec
from .io import storage
from .settings import default

__all__ = ["GateFailed", "load_model_step", "heatmaps_step", "analyze_step", "plan_step", "shard_step",
           "merge_step", "layers_step", "animate_step", "road_step", "baseline_step", "gate_step", "promote_step",
           "gate_outputs"]

_MAX_LISTED_RULES = 20


class GateFailed(RuntimeError):
    """A hard gate (``fail_on_violation``) failed; the message lists the failing rules."""

    def __init__(self, message: str, failed: list[str] | None = None):
        super().__init__(message)
        self.failed = list(failed or [])

    @classmethod
    def from_decision(cls, decision) -> "GateFailed":
        rules = [_rule_text(r) for r in decision.failed]
        shown = rules[:_MAX_LISTED_RULES]
        if len(rules) > len(shown):
            shown.append(f"... and {len(rules) - len(shown)} more")
        msg = (f"heatmap gate failed: policy '{decision.policy}' violated by {len(rules)} rule(s): "
               + "; ".join(shown))
        return cls(msg, [r.rule for r in decision.failed])


def _rule_text(r) -> str:
    value = "n/a" if r.value is None or (isinstance(r.value, float) and math.isnan(r.value)) else f"{r.value:.4g}"
    why = f" ({r.reason})" if r.reason else ""
    return f"{r.rule} @ {r.scope} = {value}, limit {r.op} {r.threshold:g}{why}"


# --------------------------------------------------------------------------- load_model


def load_model_step(model_card: str, out_path: str, *, device: str = default("device", "load_model_step")) -> dict:
    """Validate a model card and write it, resolved, to ``out_path``; return the model's metadata.

    Validation is the real thing: weights are read and loaded strictly, one dummy forward runs and
    the target layer is resolved, so a broken card fails here and not after the GPU step started.
    The resolved card is a valid model card (JSON) with ``weights`` as an absolute URI and the
    target layer filled in, so later steps need nothing but this file.
    """
    from .model import load_model, resolved_card

    lm = load_model(model_card, device=device)
    card = resolved_card(lm)
    storage.write_bytes(out_path, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return {**lm.metadata(), "source_card": model_card, "weights": card["weights"]}


# --------------------------------------------------------------------------- heatmaps


def heatmaps_step(model_path: str, data: str, out_path: str, *, method: str = default("method"),
                  target: str = default("target"), batch_size: int = default("batch_size"),
                  device: str = default("device"), card_sha256: str = "", checkpoint: str = default("checkpoint"),
                  static_mask: str = default("static_mask"), checkpoint_rows: int = default("checkpoint_rows"),
                  budget: int = default("budget"), seed: int = default("seed"), amp: str = default("amp"),
                  score_threshold: float = default("score_threshold"),
                  annotations: str = default("annotations"),
                  classes: str = default("classes")) -> dict:
    """Resolved card + data -> heatmaps Parquet (predictions and raw maps; masks are not read).

    ``card_sha256`` (the original card's hash, from the model artifact's metadata) is recorded
    in the file instead of the resolved card's, so results trace back to what the user wrote.
    ``checkpoint``: where rows are committed as they come (e.g. under the run's output prefix on
    S3): a restarted task resumes there instead of beside its pod-local output path.
    """
    from .model import ModelCard, load_model
    from .runner import run

    card = ModelCard.load(model_path)
    if card_sha256:
        card.sha256 = card_sha256
    lm = load_model(card, device=device)
    summary = run(lm, data, out_path, method=method, target=target, batch_size=int(batch_size),
                  analyze=False, progress=False, checkpoint=_tidy(checkpoint) or None,
                  static_mask=static_mask or None, checkpoint_rows=int(checkpoint_rows), budget=int(budget),
                  seed=int(seed), amp=amp, score_threshold=float(score_threshold), annotations=annotations or None,
                  classes=classes or None)
    return {**summary.to_dict(), "device": str(lm.device), "method": method}


# --------------------------------------------------------------------------- analyze


def mask_spec(mask_marks_valid: bool = default("mask_marks_valid"), invalid_ids: str = default("invalid_ids")
              ) -> MaskSpec:
    """Component parameters -> MaskSpec; ``invalid_ids`` is a comma-separated list ('' = none)."""
    return MaskSpec.parse(mask_marks_valid, invalid_ids)


def _tidy(uri: str) -> str:
    # output_prefix + '/results.parquet' doubles the slash when the prefix ends in '/'
    return re.sub(r"(?<!:)/{2,}", "/", uri)


def analyze_step(heatmaps_path: str, out_path: str, *, data: str = "", static_mask: str = default("static_mask"),
                 mask_marks_valid: bool = default("mask_marks_valid"), invalid_ids: str = default("invalid_ids"),
                 topk: float = default("topk"), export_uri: str = "") -> dict:
    """Heatmaps Parquet + masks -> results Parquet; also copied to ``export_uri`` when given."""
    from .runner import analyze

    spec = mask_spec(mask_marks_valid, invalid_ids) if (mask_marks_valid or invalid_ids) else None
    summary = analyze(heatmaps_path, out_path, data=data or None, static_mask=static_mask or None,
                      mask_spec=spec, topk=float(topk), progress=False)
    out = summary.to_dict()
    if export_uri:
        export_uri = _tidy(export_uri)
        storage.upload(out_path, export_uri)
        out["exported"] = export_uri
    return out


# --------------------------------------------------------------------------- shards


def plan_step(data: str, shards: int, out_prefix: str, *, static_mask: str = default("static_mask")) -> list[str]:
    """Data set -> shard manifests under ``out_prefix``; returns their URIs (the pipeline's loop items)."""
    from .runner.shards import plan

    return plan(data, int(shards), _tidy(out_prefix), static_mask=static_mask or None)


def shard_step(model_path: str, shard: str, *, method: str = default("method"), target: str = default("target"),
               batch_size: int = default("batch_size"), device: str = default("device"),
               static_mask: str = default("static_mask"), mask_marks_valid: bool = default("mask_marks_valid"),
               invalid_ids: str = default("invalid_ids"), topk: float = default("topk"),
               budget: int = default("budget"), seed: int = default("seed"), amp: str = default("amp"),
               card_sha256: str = "", attempts: int = default("attempts"),
               score_threshold: float = default("score_threshold"), annotations: str = default("annotations"),
               classes: str = default("classes")) -> dict:
    """Resolved card + one shard manifest -> the shard's results part beside it (heatmaps and metrics in
    one pass); a shard already done is skipped. See :func:`camgate.runner.shards.run_shard`."""
    from .model import ModelCard, load_model
    from .runner.shards import run_shard

    card = ModelCard.load(model_path)
    if card_sha256:
        card.sha256 = card_sha256
    lm = load_model(card, device=device)
    out = run_shard(lm, shard, attempts=int(attempts), method=method, target=target, batch_size=int(batch_size),
                    static_mask=static_mask or None, mask_spec=mask_spec(mask_marks_valid, invalid_ids),
                    topk=float(topk), budget=int(budget), seed=int(seed), amp=amp,
                    score_threshold=float(score_threshold), annotations=annotations or None,
                    classes=classes or None)
    return {**out, "device": str(lm.device), "method": method}


def merge_step(parts: list[str], out_path: str, *, data: str = "", export_uri: str = "") -> dict:
    """Shard parts -> one results Parquet, after checking they cover ``data`` exactly once; also copied
    to ``export_uri`` when given."""
    from .runner.shards import merge

    out = merge(list(parts), out_path, data=data or None)
    if export_uri:
        export_uri = _tidy(export_uri)
        storage.upload(out_path, export_uri)
        out["exported"] = export_uri
    return out


# --------------------------------------------------------------------------- layers, animation, ROAD


def layers_step(model_path: str, data: str, out_path: str, *, layers: str = default("layers"),
                method: str = default("method"), target: str = default("target"),
                static_mask: str = default("static_mask"), batch_size: int = default("batch_size", "layers_step"),
                device: str = default("device"), card_sha256: str = "") -> dict:
    """Resolved card + data -> layers Parquet (every selected layer's map per image, with metrics
    when masks are known). ``card_sha256``: the original card's hash, recorded as the heatmaps steps do."""
    from .model import ModelCard, load_model
    from .runner import run_layers

    card = ModelCard.load(model_path)
    if card_sha256:
        card.sha256 = card_sha256
    lm = load_model(card, device=device)
    s = run_layers(lm, data, out_path, layers=layers, method=method, target=target,
                   static_mask=static_mask or None, batch_size=int(batch_size), progress=False)
    return {**s.to_dict(), "device": str(lm.device), "method": method}


def animate_step(model_path: str, image: str, out_dir: str, *, mask: str = "", layers: str = default("layers"),
                 method: str = default("method"), target: str = default("target", "animate_step"),
                 norm: str = default("norm"), fps: float = default("fps"), device: str = default("device")) -> str:
    """One image through every layer -> animation files under ``out_dir``; returns a self-contained
    HTML page with the GIF (or, when that is too large for KFP's viewer, the contact sheet) and the
    per-layer invalid activation curve."""
    from .report.animate import animate_image, animation_html

    animate_image(model_path, image, out_dir, mask=mask or None, layers=layers, method=method, target=target,
                  norm=norm, fps=float(fps), device=device)
    return animation_html(out_dir, image)


def road_step(model_path: str, data: str, out_path: str, *, method: str = default("method"),
              layers: str = default("layers", "road_step"), sample: int = default("sample"),
              seed: int = default("seed"), target: str = default("target"), device: str = default("device"),
              sanity: bool = default("sanity"), card_sha256: str = "") -> dict:
    """ROAD faithfulness of the maps on a seeded sample -> ROAD Parquet; returns flat metrics.

    ``sample`` 0 writes an empty ROAD file at once (the pipeline's switch: no model is loaded).
    ``card_sha256``: the original card's hash, recorded instead of the resolved card's (as the
    heatmaps steps do), so the gate can check that the ROAD file scored the results' model."""
    from .gating import road_stats
    from .io import results
    from .metrics.road import PERCENTILES
    from .model import ModelCard, load_model
    from .runner import run_road

    if int(sample) <= 0:
        schema = results.schema(None, {"stage": "road", "sample": 0}, results.road_fields(PERCENTILES, bool(sanity)))
        with results.ResultsWriter(out_path, schema):
            pass
        return {"road_images": 0}
    card = ModelCard.load(model_path)
    if card_sha256:
        card.sha256 = card_sha256
    lm = load_model(card, device=device)
    run_road(lm, data, out_path, method=method, layers=layers, sample=int(sample), seed=int(seed), target=target,
             sanity=bool(sanity), progress=False)
    stats = {k: v for k, v in road_stats(out_path).items() if isinstance(v, (int, float))}
    md = results.run_metadata(out_path)
    if "ybroad" in md:
        stats.update(ybroad_max=md["ybroad"]["ybroad_max"], ybroad_mean=md["ybroad"]["ybroad_mean"])
    return stats


# --------------------------------------------------------------------------- baseline (champion)

NO_BASELINE = "no-baseline"  # stage of the empty file the baseline task writes when there is no champion


def baseline_step(out_path: str, data: str, *, model_card: str = "", results_uri: str = "",
                  method: str = default("method"), target: str = default("target"),
                  batch_size: int = default("batch_size"), static_mask: str = default("static_mask"),
                  mask_marks_valid: bool = default("mask_marks_valid"), invalid_ids: str = default("invalid_ids"),
                  device: str = default("device"), checkpoint: str = default("checkpoint"),
                  budget: int = default("budget"), seed: int = default("seed"), amp: str = default("amp"),
                  score_threshold: float = default("score_threshold"),
                  annotations: str = default("annotations"),
                  classes: str = default("classes")) -> dict:
    """The champion's results on the same data: computed from ``model_card`` with the challenger's
    settings, or copied from ``results_uri``; with neither, an empty file marked as no baseline (the
    pipeline's switch: the gate then skips the baseline rules)."""
    from .io import results
    from .runner import run

    if model_card and results_uri:
        from .errors import ConfigError

        raise ConfigError("give the champion as a model card or as results, not both")
    if model_card:
        spec = mask_spec(mask_marks_valid, invalid_ids)
        summary = run(model_card, data, out_path, method=method, target=target, batch_size=int(batch_size),
                      static_mask=static_mask or None, mask_spec=spec, device=device, progress=False,
                      checkpoint=_tidy(checkpoint) or None, budget=int(budget), seed=int(seed), amp=amp,
                      score_threshold=float(score_threshold), annotations=annotations or None,
                      classes=classes or None)
        return {**summary.to_dict(), "source": model_card}
    if results_uri:
        storage.write_bytes(out_path, storage.read_bytes(results_uri))
        return {"source": results_uri}
    with results.ResultsWriter(out_path, results.schema(None, {"stage": NO_BASELINE})):
        pass
    return {"source": ""}


def _baseline_or_none(path: str) -> str | None:
    from .io import results

    return None if not path or results.run_metadata(path).get("stage") == NO_BASELINE else path


# --------------------------------------------------------------------------- gate


def gate_step(results_path: str, policy: str, *, fail_on_violation: bool = False, export_prefix: str = "",
              summary_path: str | None = None, report_path: str | None = None, road: str = "",
              baseline: str = "", record_path: str | None = None, junit_path: str | None = None):
    """Results + policy -> ``(decision, files, metrics)``; ``files`` maps the names in
    :data:`camgate.report.FILES` to their bytes.

    Writes the Markdown/HTML/record/JUnit to the given paths and, with ``export_prefix``, every file
    under it — all before a hard gate raises :class:`GateFailed`, because a failed task's output
    artifacts are never stored: the exported copies are then the only report of why the gate failed.
    ``baseline``: the champion's results on the same data, for the policy's baseline rules.
    """
    decision, files = report.artifacts(results_path, policy, road=road or None, baseline=_baseline_or_none(baseline))
    for path, name in ((summary_path, "summary.md"), (report_path, "report.html"), (record_path, "record.json"),
                       (junit_path, "junit.xml")):
        if path:
            storage.write_bytes(path, files[name])
    if export_prefix:
        for name, body in files.items():
            storage.write_bytes(storage.join(export_prefix, name), body)
    if fail_on_violation and not decision.passed:
        raise GateFailed.from_decision(decision)
    return decision, files, report.metrics(decision)


def gate_outputs(decision) -> dict:
    """The gate component's scalar outputs. KFP parameters cannot carry NaN: -1.0 stands for
    'not measurable' (no ok image)."""
    def finite(v) -> float:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else -1.0

    return {"passed": bool(decision.passed),
            "mean_invalid_activation_ratio": finite(decision.overall.get("mean_invalid_activation_ratio")),
            "error_rate": finite(decision.overall.get("error_rate")),
            "n_images": int(decision.counts["rows"])}


# --------------------------------------------------------------------------- promote


def promote_step(model_path: str, passed: bool, *, record: str = "", promote_to: str = "",
                 registry_address: str = "", registry_port: int = 0, registry_author: str = "camgate",
                 card_sha256: str = "") -> dict:
    """The promote component's work: :func:`camgate.promote.promote` with its parameters, where ''
    and 0 stand for 'not given' (KFP parameters have no None). ``card_sha256``: the hash of the card
    ``model_path`` was resolved from (the model artifact's metadata), which the record names."""
    from .promote import promote

    return promote(model_path, record or None, promote_to or None, passed=passed, registry=registry_address or None,
                   registry_port=int(registry_port) or None, author=registry_author or "camgate",
                   card_sha256=card_sha256 or None)
