"""``camgate demo``: the heatmap-gate pipeline end to end on an embedded S3 server.

1. generate the synthetic underpass data set in two variants (clean / shortcut) and train one small
   classifier on each, and with ground-truth boxes one small detector (FCOS) on each (all cached
   under the work directory);
2. start SeaweedFS on loopback and upload test data, masks, model cards, weights and the policy;
3. compile the ``heatmap-gate`` pipeline and run the compiled YAML with ``kfp.local`` for each model;
4. print model, test accuracy, mean invalid activation ratio, gate verdict and report path.

Both models of each task are accurate; only the shortcut ones, which look at the wall lamp, fail.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import yaml

from ..io import storage
from . import detect, segment, synth
from .train import train

BUCKET = "camgate-demo"
ROAD_SAMPLE = 32  # images whose heatmaps get a ROAD faithfulness score in the pipeline
LAYER_SAMPLE = 24  # images whose maps are computed at every layer
LAYERS_SHOWN = ("layer1.1.conv2", "layer2.0.conv1", "layer2.1.conv2", "layer3.0.conv1", "layer3.1.conv2",
                "layer4.0.conv1", "layer4.1.conv2")  # the animation: one frame per stage, early to late
# Half of the image is invalid (walls, ceiling), so a flat heatmap scores ~0.5. The policy asks for
# heatmaps that rest on the walkway, where the objects are, and for no more attention on invalid
# pixels than their share of the image. No per-class limits: for class "empty" there is no object
# to look at and its maps spread at about the area share, which is not a shortcut.
POLICY = {
    "name": "underpass-no-shortcuts",
    "description": "Heatmaps must rest on the walkway, not on walls or ceiling.",
    "rules": {
        "mean_invalid_activation_ratio": {"max": 0.35},
        "mean_excess_over_area": {"max": 0.0},
        "share_images_over": {"ratio": 0.5, "max": 0.25},
        "error_rate": {"max": 0.0},
        "min_images": 50,
        # champion/challenger: a new model may not look at invalid pixels more than production does
        "baseline_mean_increase": {"max": 0.05},
        "baseline_share_worse": {"by": 0.1, "max": 0.2},
        # the verdict is evidence only if the maps show what the model uses: ROAD beats a random map,
        # and the maps change when the weights are randomised and between classes
        "faithfulness": {"min_margin": 0.05},
        "sanity": {"max_randomised_similarity": 0.5, "max_random_logit_similarity": 0.5},
    },
}
CHAMPION = "clean"  # in production; every other variant is gated against it on its own test data
# Segmenters: one row per (image, object class), the map explaining the class's predicted region. The
# background class is left out (its region holds the walls); a named class the image does not show is
# a no_region row. The policy asks each object class's evidence to come from the walkway.
SEGMENTER_CLASSES = "pedestrian,bike,dog"
SEGMENTER_POLICY = {
    "name": "underpass-segmenter-no-shortcuts",
    "description": "Each object class's region must be explained by the walkway, not by walls or ceiling.",
    "per_class": True,
    "min_scope_images": 20,
    "rules": {
        "mean_invalid_activation_ratio": {"max": 0.4},
        "share_images_over": {"ratio": 0.5, "max": 0.25},
        "error_rate": {"max": 0.0},
        "min_images": 50,
    },
}
# Detectors: one row per ground-truth box (the detection matched to it, else `missed`). The policy asks
# each detected class's heatmaps to rest on the walkway; a flat map scores about the invalid share.
DETECTOR_POLICY = {
    "name": "underpass-detector-no-shortcuts",
    "description": "Each detection's heatmap must rest on the walkway, not on walls or ceiling.",
    "per_class": True,
    "min_scope_images": 20,
    "rules": {
        "mean_invalid_activation_ratio": {"max": 0.4},
        "share_images_over": {"ratio": 0.5, "max": 0.25},
        "error_rate": {"max": 0.0},
        "min_images": 50,
    },
}


def _upload_dir(local: Path, prefix: str, names: list[str]) -> None:
    for name in names:
        storage.write_bytes(storage.join(prefix, name), (local / name).read_bytes())


def _publish(name: str, card_path: Path, base: str) -> tuple[str, str, dict]:
    """Upload one model and its test split; return (card URI, manifest URI, training metrics)."""
    model_dir = card_path.parent
    metrics = json.loads((model_dir / "metrics.json").read_text())
    test_csv = (model_dir / metrics["data"]).resolve()
    data_dir = test_csv.parent
    prefix = storage.join(base, name)
    _upload_dir(model_dir, storage.join(prefix, "model"), ["card.yaml", "model.safetensors"])
    lines = test_csv.read_text().splitlines()
    files = sorted({p for line in lines[1:] for p in line.split(",")[:2]})
    _upload_dir(data_dir, storage.join(prefix, "data"), ["test.csv", *files])
    return storage.join(prefix, "model", "card.yaml"), storage.join(prefix, "data", "test.csv"), metrics


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(workdir: str | os.PathLike, seed: int = 0, echo: bool = False, log=_say) -> list[dict]:
    """The demo; returns one dict per model (also written to ``<workdir>/demo.json``).
    ``log`` gets a progress line per step (training epochs, pipeline tasks)."""
    from ..io.devserver import S3Server
    from ..kfp.compile import compile_pipeline

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cards = {v: train(v, work / "cache", seed=seed, log=log) for v in synth.VARIANTS}
    detectors = {v: detect.train_detector(v, work / "cache", seed=seed, log=log) for v in synth.VARIANTS}
    segmenters = {v: segment.train_segmenter(v, work / "cache", seed=seed, log=log) for v in synth.VARIANTS}
    pipeline_yaml = compile_pipeline(str(work / "heatmap_gate.yaml"))
    server = S3Server(work / "s3", access_key=f"demo-{secrets.token_hex(4)}", secret_key=secrets.token_hex(16))
    with server:
        previous = server.apply_env()
        try:
            rows = _run_models(cards, work, pipeline_yaml, echo, log)
            # detectors: per ground-truth box the detection matched to it; segmenters: per (image, object class)
            rows += _run_per_object("detection", "det", detectors, DETECTOR_POLICY, "one row per ground-truth box",
                                    {}, ("map50",), work, pipeline_yaml, echo, log)
            rows += _run_per_object("segmentation", "seg", segmenters, SEGMENTER_POLICY,
                                    "one row per (image, object class)", {"classes": SEGMENTER_CLASSES},
                                    ("object_miou", "miou"), work, pipeline_yaml, echo, log)
        finally:  # the caller's own S3 settings come back
            server.restore_env(previous)
    (work / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _pipeline(name: str, params: dict, report: Path, work: Path, pipeline_yaml: str, echo: bool,
              log) -> tuple[dict, dict]:
    """One run of the compiled pipeline through kfp.local, its tasks announced as ``name``: (the
    run's outputs, its decision); the HTML report is copied to ``report``."""
    from ..kfp import local_run

    r = local_run(params, pipeline_root=str(work / "kfp"), package_path=pipeline_yaml, echo=echo,
                  progress=lambda line: log(f"{name}: {line}"))
    out_prefix = params["output_prefix"]
    report.parent.mkdir(exist_ok=True)
    report.write_bytes(storage.read_bytes(storage.join(out_prefix, "report.html")))
    return r, json.loads(storage.read_bytes(storage.join(out_prefix, "decision.json")))


def _run_models(cards: dict, work: Path, pipeline_yaml: str, echo: bool, log) -> list[dict]:
    rows = []
    base = storage.ensure_bucket(BUCKET)
    policy_uri = storage.join(base, "policy.yaml")
    storage.write_bytes(policy_uri, yaml.safe_dump(POLICY, sort_keys=False).encode())
    published = {}
    for variant, card in cards.items():
        card_uri, data_uri, metrics = _publish(variant, card, base)
        published[variant] = card_uri
        champion = published[CHAMPION] if variant != CHAMPION else ""
        out_prefix = storage.join(base, "runs", variant)
        log(f"{variant}: heatmap-gate pipeline (compiled YAML, kfp.local)"
            + (f", champion: underpass-{CHAMPION}" if champion else ""))
        report = work / "reports" / f"{variant}.html"
        r, decision = _pipeline(variant, {"model_card": card_uri, "data": data_uri, "policy": policy_uri,
                                          "output_prefix": out_prefix, "fail_on_violation": False,
                                          "road_sample": ROAD_SAMPLE, "sanity": True,
                                          "baseline_model_card": champion,
                                          "promote_to": storage.join(base, "promoted")},
                                report, work, pipeline_yaml, echo, log)
        overall = decision["overall"]
        for name in ("record.json", "junit.xml"):
            (report.parent / f"{variant}-{name}").write_bytes(storage.read_bytes(storage.join(out_prefix, name)))
        log(f"{variant}: maps of every layer for {LAYER_SAMPLE} test images")
        curve = _layer_curve(card, data_uri, work / "reports" / f"{variant}-layers", log)
        rows.append({"model": f"underpass-{variant}", "variant": variant,
                     "test_accuracy": metrics["test_accuracy"],
                     "mean_invalid_activation_ratio": r["mean_invalid_activation_ratio"],
                     "road": overall.get("road_mean"), "road_random": overall.get("road_random_mean"),
                     "randomised_similarity": overall.get("mean_randomised_spearman"),
                     "random_logit_similarity": overall.get("mean_random_logit_spearman"),
                     "trusted": decision["trusted"], "trust_reason": decision["trust_reason"],
                     "champion": f"underpass-{CHAMPION}" if champion else None,
                     "baseline_mean_increase": overall.get("baseline_mean_increase"),
                     "regression": _regression(decision),
                     "passed": bool(r["passed"]), "promoted": bool(r["promoted"]),
                     "promoted_files": _promoted_files(storage.join(base, "promoted", f"underpass-{variant}")),
                     "n_images": r["n_images"], "report": str(report), "layer_curve": curve,
                     "results": storage.join(out_prefix, "results.parquet")})
    return rows


def _run_per_object(task: str, short: str, cards: dict, policy: dict, rows_are: str, params: dict,
                    quality: tuple[str, ...], work: Path, pipeline_yaml: str, echo: bool, log) -> list[dict]:
    """The same pipeline for the detectors or the segmenters (``task``; model names ``underpass-<short>-*``):
    several rows per image (``rows_are``), gated per class with ``policy``; ``params``: pipeline inputs
    of their own; ``quality``: the training metrics' test figures kept in each row."""
    rows = []
    base = storage.join(storage.ensure_bucket(BUCKET), task)
    policy_uri = storage.join(base, "policy.yaml")
    storage.write_bytes(policy_uri, yaml.safe_dump(policy, sort_keys=False).encode())
    for variant, card in cards.items():
        name = f"underpass-{short}-{variant}"
        card_uri, data_uri, metrics = _publish(variant, card, base)
        out_prefix = storage.join(base, "runs", variant)
        log(f"{name}: heatmap-gate pipeline (compiled YAML, kfp.local), {rows_are}")
        report = work / "reports" / f"{short}-{variant}.html"
        r, decision = _pipeline(name, {"model_card": card_uri, "data": data_uri, "policy": policy_uri,
                                       "output_prefix": out_prefix, "fail_on_violation": False, **params,
                                       "promote_to": storage.join(base, "promoted")},
                                report, work, pipeline_yaml, echo, log)
        per_class = {s["scope"].split("=", 1)[1]: s["mean_invalid_activation_ratio"]
                     for s in decision["scopes"] if s["scope"].startswith("class=")}
        rows.append({"model": name, "variant": variant, "task": task, **{k: metrics["test"][k] for k in quality},
                     "mean_invalid_activation_ratio": r["mean_invalid_activation_ratio"],
                     "per_class_invalid_ratio": per_class, "counts": decision["counts"],
                     "passed": bool(r["passed"]), "promoted": bool(r["promoted"]),
                     "promoted_files": _promoted_files(storage.join(base, "promoted", name)),
                     "n_images": r["n_images"], "report": str(report),
                     "results": storage.join(out_prefix, "results.parquet")})
    return rows


def _promoted_files(prefix: str) -> list[str]:
    """Names of the files a completed promotion of this model holds (none when it was not promoted)."""
    from ..promote import promoted

    folders = sorted({u.rsplit("/", 1)[0] for u in storage.list_uris(prefix)})
    marks = [m for m in map(promoted, folders) if m]
    return sorted(marks[0]["files"]) if marks else []


def _regression(decision: dict) -> str | None:
    """PASS/FAIL over the baseline rules, None when no champion was compared."""
    verdicts = [r["verdict"] for r in decision["rules"] if r["rule"].startswith("baseline_")]
    if not verdicts or set(verdicts) == {"skip"}:
        return None
    return "FAIL" if "fail" in verdicts else "PASS"


def _layer_curve(card: Path, data_uri: str, out: Path, log) -> list[tuple[str, float]]:
    """Per-layer mean invalid activation ratio over the first test images (one pass per batch), and
    the animation of the first pedestrian image: where in the network attention lands on the wall."""
    from ..data.manifest import load_items
    from ..io import results
    from ..report.animate import animate_image
    from ..runner.layers import run_layers

    out.mkdir(parents=True, exist_ok=True)
    items = load_items(data_uri)
    run_layers(str(card), data_uri, str(out / "layers.parquet"), items=items[:LAYER_SAMPLE], progress=False)
    df = results.read(str(out / "layers.parquet"))
    mean = df[df["status"] == "ok"].groupby(["layer_index", "layer"])["invalid_activation_ratio"].mean()
    walker = next(it for it in items if it.label == "pedestrian")
    animate_image(str(card), walker.image, out / "animation", mask=walker.mask, layers=",".join(LAYERS_SHOWN), fps=2)
    return [(name, round(float(v), 4)) for (_, name), v in mean.items()]


def table(rows: list[dict]) -> str:
    head = (f"{'model':20s} {'test acc':>8s} {'mean invalid ratio':>19s} {'ROAD':>6s} {'random':>6s} "
            f"{'rand. model':>11s} {'other class':>11s} {'trusted':>7s} {'vs champion':>17s} {'gate':>5s}  report")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("task") in ("detection", "segmentation"):
            continue
        road = "   n/a" if r.get("road") is None else f"{r['road']:6.3f}"
        rnd = "   n/a" if r.get("road_random") is None else f"{r['road_random']:6.3f}"
        sims = " ".join("        n/a" if r.get(k) is None else f"{r[k]:11.3f}"
                        for k in ("randomised_similarity", "random_logit_similarity"))
        trusted = {True: "yes", False: "NO", None: "n/a"}[r.get("trusted")]
        lines.append(f"{r['model']:20s} {r['test_accuracy']:8.3f} {r['mean_invalid_activation_ratio']:19.3f} "
                     f"{road} {rnd} {sims} {trusted:>7s} {_vs(r):>17s} {'PASS' if r['passed'] else 'FAIL':>5s}  "
                     f"{r['report']}")
    for task, kind, quality, what in (("detection", "detector", "map50", "mAP@0.5"),
                                      ("segmentation", "segmenter", "object_miou", "obj mIoU")):
        group = [r for r in rows if r.get("task") == task]
        if not group:
            continue
        head = f"{kind:24s} {what:>8s} {'mean invalid ratio':>19s}  {'per class':34s} {'gate':>5s}  report"
        lines += ["", head, "-" * len(head)]
        for r in group:
            per = " ".join(f"{k} {v:.2f}" for k, v in r["per_class_invalid_ratio"].items() if v is not None)
            lines.append(f"{r['model']:24s} {r[quality]:8.3f} {r['mean_invalid_activation_ratio']:19.3f}  {per:34s} "
                         f"{'PASS' if r['passed'] else 'FAIL':>5s}  {r['report']}")
    return "\n".join(lines)


def _vs(r: dict) -> str:
    if not r.get("regression"):
        return "(champion)" if r.get("champion") is None else "n/a"
    return f"{r['baseline_mean_increase']:+.3f} {r['regression']}"


def takeover(rows: list[dict]) -> str:
    """Where the shortcut model's attention moves onto invalid pixels, compared with the clean model."""
    by = {r["variant"]: dict(r["layer_curve"]) for r in rows if "layer_curve" in r}
    if set(by) != {"clean", "shortcut"}:
        return ""
    gaps = [(name, by["shortcut"][name] - by["clean"].get(name, float("nan"))) for name in by["shortcut"]]
    first = next((name for name, g in gaps if g > 0.1), None)
    name, gap = max(gaps, key=lambda kv: kv[1] if kv[1] == kv[1] else -1)
    return (f"per layer (mean invalid activation ratio, shortcut - clean): the gap first exceeds 0.1 at "
            f"{first}, and is largest at {name} (+{gap:.2f}); curves and animations in .cache/demo/reports/")


def main(args) -> int:
    rows = run_demo(args.workdir, seed=args.seed, echo=False)
    print(table(rows))
    print(takeover(rows))
    rules = POLICY["rules"]
    print(f"\npolicy: mean invalid activation ratio <= {rules['mean_invalid_activation_ratio']['max']}, "
          f"no more attention on invalid pixels than their area share, at most "
          f"{rules['share_images_over']['max']:.0%} of images above {rules['share_images_over']['ratio']}; "
          f"invalid pixels = walls, ceiling, far opening; against the champion (underpass-{CHAMPION}) the mean ratio "
          f"may rise by at most {rules['baseline_mean_increase']['max']} and at most "
          f"{rules['baseline_share_worse']['max']:.0%} of images may worsen by more than "
          f"{rules['baseline_share_worse']['by']}; the heatmaps are trusted when ROAD beats a random map by "
          f"{rules['faithfulness']['min_margin']} and their Spearman similarity to the maps of the randomised model "
          f"and of another class stays <= {rules['sanity']['max_randomised_similarity']} / "
          f"{rules['sanity']['max_random_logit_similarity']} (on {ROAD_SAMPLE} images)")
    det = DETECTOR_POLICY["rules"]
    print(f"detectors: per ground-truth box the matched detection's map; per detected class the mean invalid "
          f"activation ratio <= {det['mean_invalid_activation_ratio']['max']} and at most "
          f"{det['share_images_over']['max']:.0%} of detections above {det['share_images_over']['ratio']}")
    seg = SEGMENTER_POLICY["rules"]
    print(f"segmenters: per object class ({SEGMENTER_CLASSES}) the map of its predicted region; per class the mean "
          f"invalid activation ratio <= {seg['mean_invalid_activation_ratio']['max']} and at most "
          f"{seg['share_images_over']['max']:.0%} of rows above {seg['share_images_over']['ratio']}")
    return 0
