"""camgate: heatmap test gates for vision models.

The public API, for notebooks and test suites (details in each function's docstring)::

    import camgate

    ex = camgate.explain(model, images, target_layer="layer4", input={"size": [224, 224]})
    results, decision = camgate.evaluate(model, images, masks, policy="policy.yaml")
    camgate.run("card.yaml", "manifest.csv", "results.parquet")      # the `camgate run` step
    decision = camgate.gate("results.parquet", "policy.yaml")          # the `camgate gate` step
    df = camgate.read_results("results.parquet")

Everything is imported on first use, so ``import camgate`` does not import torch. The
implementation lives in subpackages by job: ``io`` (storage, results files), ``data``, ``model``,
``cam``, ``metrics``, ``runner`` (the run verbs), ``gating`` (policy, statistics, decision),
``report``, ``kfp``; :mod:`camgate.steps` is what the KFP components call.
"""
import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camgate")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

_LAZY = {
    "Explanation": ("api", "Explanation"),
    "explain": ("api", "explain"),
    "evaluate": ("api", "evaluate"),
    "run": ("runner", "run"),
    "analyze": ("runner", "analyze"),
    "gate": ("gating", "gate"),
    "read_results": ("io.results", "read"),
    "load_model": ("model", "load_model"),
}

__all__ = ["Explanation", "__version__", "analyze", "evaluate", "explain", "gate", "load_model", "read_results",
           "run"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
