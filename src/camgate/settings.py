"""Every run setting once: name, type, default, help, and where it is taken.

A run setting is an option whose value a run's numbers (or its execution) depend on: the method,
the target, the batch size, the black-box budget and seed, the mask options... Each is one row of
:data:`SETTINGS`, naming the places that take it:

- ``verbs``: ``camgate`` subcommands; their options are built from the table (:func:`add_arguments`),
  flag ``--name-with-dashes``;
- ``steps``: functions of :mod:`camgate.steps`, where it is a keyword-only parameter with the default
  :func:`default` gives;
- ``components``: KFP components of :mod:`camgate.kfp.components`, which keep literal defaults (KFP
  copies their source into the task), checked against the table by ``tests/test_settings.py``;
  their input descriptions come from the help text (:func:`documented`);
- ``pipeline``: an input of the ``heatmap-gate`` pipeline, passed to every task that takes it.

``at`` holds what differs at one place (a verb, step or component name): its ``default``, ``help`` or,
for the CLI, argparse ``type``. In steps and components ``''`` stands for "not given" (KFP parameters
have no None); the CLI leaves such an option None.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Setting", "SETTINGS", "VERBS", "get", "default", "help_text", "add_arguments", "documented"]

# the CLI verbs whose options come (in part) from this table
VERBS = ("run", "layers", "animate", "road", "analyze", "shard")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    verbs: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    pipeline: bool = False
    at: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    action: str | None = None  # argparse action other than the one the type implies ('append')

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def places(self) -> tuple[str, ...]:
        return self.verbs + self.steps + self.components


# places that share a setting, named once
_HEATMAPS = dict(steps=("heatmaps_step", "shard_step", "baseline_step"),
                 components=("compute_heatmaps", "shard_worker", "champion_results"))
_MASKS = dict(steps=("analyze_step", "shard_step", "baseline_step"),
              components=("analyze_invalid_activation", "shard_worker", "champion_results"))
_LAYERS = ("layers_step", "layer_maps", "layers")
_ROAD = ("road_step", "road_faithfulness", "road")
_ANIMATE = ("animate_step", "animate_layers", "animate")


def _at(places, **what) -> dict:
    return {p: what for p in places}


_TABLE = (
    Setting("method", str, "gradcam",
            "CAM method (gradcam, gradcam++, layercam, ...), or a black-box method (decam, rise: the only ones "
            "for ONNX/callable model cards)",
            verbs=("run", "layers", "animate", "road"),
            steps=_HEATMAPS["steps"] + ("layers_step", "animate_step", "road_step"),
            components=_HEATMAPS["components"] + ("layer_maps", "animate_layers", "road_faithfulness"),
            pipeline=True, at=_at(_LAYERS + _ANIMATE, help="a native CAM method (gradcam, gradcam++, layercam, ...)")),
    Setting("target", str, "predicted", "class to explain: predicted | label (the manifest's; of a multi-label "
            "model: its ;-separated labels) | <class index>",
            verbs=("run", "layers", "animate", "road"),
            steps=_HEATMAPS["steps"] + ("layers_step", "animate_step", "road_step"),
            components=_HEATMAPS["components"] + ("layer_maps", "animate_layers", "road_faithfulness"),
            pipeline=True, at=_at(_ANIMATE, help="class to explain: predicted | <class index>")),
    Setting("target_layer", str, None, "dotted module path (repeat for several; default: the model card's)",
            verbs=("run",), action="append"),
    Setting("layers", str, "all", "all | comma-separated module names (name#k: the k-th call of a module)",
            verbs=("layers", "animate", "road"), steps=("layers_step", "animate_step", "road_step"),
            components=("layer_maps", "animate_layers", "road_faithfulness"),
            at=_at(_ROAD, default="final",
                   help="final (the card's target layer) | all (ybROAD) | comma-separated module names")),
    Setting("batch_size", int, 16, "images per forward/backward pass",
            verbs=("run", "layers", "road"), steps=_HEATMAPS["steps"] + ("layers_step",),
            components=_HEATMAPS["components"] + ("layer_maps",), pipeline=True,
            at={**_at(_LAYERS + ("road",), default=8),
                # text, so that 'auto' and a bad value reach the runner's own check
                "run": dict(type=str, help="images per batch, or 'auto' (from free GPU memory; 16 on CPU); "
                                           "halved on GPU out-of-memory")}),
    Setting("device", str, "auto", "auto | cpu | cuda[:N]",
            verbs=("run", "layers", "animate", "road"),
            steps=_HEATMAPS["steps"] + ("load_model_step", "layers_step", "animate_step", "road_step"),
            components=_HEATMAPS["components"] + ("load_model", "layer_maps", "animate_layers", "road_faithfulness"),
            at=_at(("load_model_step", "load_model"), default="cpu",
                   help="device for the validation forward pass (cpu | cuda | auto)")),
    Setting("amp", str, "off", "off | bf16 | fp16: the model's precision (maps and metrics stay float32; recorded "
                               "in the results); off = bit-identical to a run without autocast",
            verbs=("run",), **_HEATMAPS, pipeline=True),
    Setting("decode", str, "auto", "auto (JPEGs on the GPU when running on CUDA) | cpu", verbs=("run",)),
    Setting("workers", int, 4, "threads fetching and decoding images (on CPU at most torch's thread count, "
                               "between batches)", verbs=("run", "layers", "road")),
    Setting("budget", int, 1024, "decam/rise: forward passes per image", verbs=("run",), **_HEATMAPS,
            pipeline=True),
    Setting("seed", int, 0, "decam/rise: base seed (each image: seed and its row)",
            verbs=("run", "road"), steps=_HEATMAPS["steps"] + ("road_step",),
            components=_HEATMAPS["components"] + ("road_faithfulness",), pipeline=True,
            at={**_at(_ROAD, help="seed of the sample and of the imputation noise"),
                "heatmap_gate": dict(help="decam/rise: base seed (each image: seed and its row); also seeds the "
                                          "ROAD sample and its imputation noise")}),
    Setting("score_threshold", float, 0.5, "detectors: explain each detection scoring at least this (with ground "
                                          "truth: the detections matched to it, among those); multi-label models: "
                                          "each label whose sigmoid probability is at least this",
            verbs=("run",), **_HEATMAPS, pipeline=True),
    Setting("annotations", str, "", "detectors: ground-truth boxes as a COCO annotations file (local or s3://; "
                                    "images matched by file name); not given = the manifest's boxes column, if any",
            verbs=("run",), **_HEATMAPS, pipeline=True),
    Setting("classes", str, "", "segmentation / multi-label models: the classes to explain, comma-separated ids or "
                                "names (not given = those predicted: present in the prediction, or scoring at "
                                "least score_threshold)",
            verbs=("run",), **_HEATMAPS, pipeline=True),
    Setting("static_mask", str, "", "one mask for every image (fixed camera: a prefix data set then needs no "
                                    "masks/); not given = per-image masks",
            verbs=("run", "layers", "analyze", "shard"),
            steps=("heatmaps_step", "analyze_step", "plan_step", "shard_step", "baseline_step", "layers_step"),
            components=("compute_heatmaps", "analyze_invalid_activation", "plan_shards", "shard_worker",
                        "champion_results", "layer_maps"), pipeline=True),
    Setting("mask_marks_valid", bool, False, "masks mark the VALID region instead of the invalid one",
            verbs=("run", "layers", "analyze", "animate"), **_MASKS, pipeline=True),
    Setting("invalid_ids", str, "", "label-map masks: comma-separated invalid label ids (not given = any non-zero "
                                    "pixel is invalid)",
            verbs=("run", "layers", "analyze", "animate"), **_MASKS),
    Setting("topk", float, 0.1, "fraction of hottest pixels for topk_invalid_share",
            verbs=("run", "layers", "analyze"), steps=("analyze_step", "shard_step"),
            components=("analyze_invalid_activation", "shard_worker")),
    Setting("checkpoint", str, "", "folder (local or s3://) where rows are committed as they come, so a restarted "
                                   "run resumes from it; not given = beside the output (OUT.parts; in a KFP task: "
                                   "lost with the pod)",
            verbs=("run",), steps=("heatmaps_step", "baseline_step"),
            components=("compute_heatmaps", "champion_results")),
    Setting("checkpoint_rows", int, 256, "commit rows every N rows; a re-run after a crash resumes from there",
            verbs=("run",), steps=("heatmaps_step",), components=("compute_heatmaps",)),
    Setting("attempts", int, 3, "tries before the task fails; each resumes from the rows the last one committed "
                                "(KFP does not retry tasks inside a ParallelFor)",
            steps=("shard_step",), components=("shard_worker",)),
    Setting("norm", str, "both", "global (one range over all layers) | layer | both (side by side)",
            verbs=("animate",), steps=("animate_step",), components=("animate_layers",)),
    Setting("fps", float, 8.0, "frames per second of the MP4 and GIF",
            verbs=("animate",), steps=("animate_step",), components=("animate_layers",)),
    Setting("percentiles", str, "", "% of pixels removed, comma-separated (not given: 10,20,...,90)",
            verbs=("road",)),
    Setting("sample", int, 0, "score a seeded random sample of N images (0 = all)",
            verbs=("road",), steps=("road_step",), components=("road_faithfulness",),
            # the pipeline's switch: ROAD is optional there
            at=_at(("road_step", "road_faithfulness"),
                   help="images scored (a seeded random sample); 0 = none: an empty ROAD file, no model loaded")),
    Setting("sanity", bool, False, "also the sanity checks of the same maps: similarity to the map of the fully "
                                   "randomised model and to the map of a seeded other class (the policy's sanity rule)",
            verbs=("road",), steps=("road_step",), components=("road_faithfulness",), pipeline=True,
            at={"heatmap_gate": dict(help="with road_sample: also the sanity checks on the ROAD sample "
                                          "(model-parameter randomisation, random logit) for the sanity rule")}),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}


def get(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"no run setting {name!r}; known: {', '.join(SETTINGS)}") from None


def default(name: str, where: str | None = None) -> Any:
    """The default of setting ``name`` (at the verb, step or component ``where``, if it differs there)."""
    s = get(name)
    return s.at.get(where, {}).get("default", s.default)


def help_text(name: str, where: str | None = None) -> str:
    s = get(name)
    return s.at.get(where, {}).get("help", s.help)


def add_arguments(parser, verb: str) -> None:
    """Add the options of every run setting ``verb`` takes to its argparse ``parser``."""
    for s in _TABLE:
        if verb not in s.verbs:
            continue
        value = default(s.name, verb)
        kw: dict[str, Any] = {"help": help_text(s.name, verb).replace("%", "%%")}
        if s.type is bool:
            kw["action"] = "store_true"
        else:
            kw["default"] = None if value == "" else value
            if s.action:
                kw["action"] = s.action
            arg_type = s.at.get(verb, {}).get("type", s.type)
            if arg_type is not str:
                kw["type"] = arg_type
        parser.add_argument(s.flag, **kw)


def _kfp_description(text: str) -> str:
    return text if text.endswith(".") else text + "."


def documented(func: Callable) -> Callable:
    """Decorator: document each parameter of ``func`` that is a run setting and that its docstring's
    ``Args:`` leaves out, with the setting's help text; KFP reads the input descriptions from there.

    Place it under ``@dsl.component``/``@dsl.pipeline``; the function's source (which KFP copies into
    the task) stays as written.
    """
    lines = inspect.cleandoc(func.__doc__ or "").splitlines()
    if "Args:" not in lines:
        at = next((i for i, line in enumerate(lines) if line in ("Returns:", "Return:")), len(lines))
        lines[at:at] = ["Args:", ""] if at < len(lines) else ["", "Args:"]
    start = lines.index("Args:") + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    while end > start and not lines[end - 1].strip():
        end -= 1
    named = {line.strip().split(":", 1)[0] for line in lines[start:end]}
    added = [f"    {p}: {_kfp_description(help_text(p, func.__name__))}"
             for p in inspect.signature(func).parameters if p in SETTINGS and p not in named]
    lines[end:end] = added
    func.__doc__ = "\n".join(lines)
    return func
