"""camgate: heatmap test gates for vision models.

The public API, for notebooks and test suites (details in each function's docstring)::

    import camgate

    ex = camgate.explain(model, images, target_layer="layer4", input={"size": [224, 224]})
    results, decision = camgate.evaluate(model, images, masks, policy="policy.yaml")
    camgate.run("card.yaml", "manifest.csv", "results.parquet")      # the `camgate run` step
    decision = camgate.gate("results.parquet", "policy.yaml")          # the `camgate gate` step
    df = camgate.read_results("results.parquet")

``explain``, ``evaluate`` (:mod:`camgate.api`), ``run``, ``analyze`` (:mod:`camgate.runner`),
``read_results`` (:func:`camgate.results.read`) and ``load_model`` (:mod:`camgate.modelspec`) are
imported on first use, so ``import camgate`` does not import torch.

``camgate.gate`` is both the module (``from camgate.gate import evaluate, load_policy`` and every
other import of it work as before) and callable as the gate function: ``camgate.gate(results,
policy)`` is ``camgate.gate.gate(results, policy)``. A plain function bound to the name would be
replaced by the module as soon as something imports ``camgate.gate``, or would hide the module from
``import camgate.gate as m`` and ``mock.patch('camgate.gate....')``; a callable module breaks neither.
"""
import importlib
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camgate")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"


class _CallableModule(types.ModuleType):
    """A module that calls its function of the same name (``camgate.gate(...)`` = ``camgate.gate.gate(...)``)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def _callable_module(name: str) -> types.ModuleType:
    module = importlib.import_module(f"{__name__}.{name}")
    if not isinstance(module, _CallableModule):
        module.__class__ = _CallableModule
    return module


gate = _callable_module("gate")  # no torch: numpy, pyarrow, yaml

_LAZY = {
    "Explanation": ("api", "Explanation"),
    "explain": ("api", "explain"),
    "evaluate": ("api", "evaluate"),
    "run": ("runner", "run"),
    "analyze": ("runner", "analyze"),
    "read_results": ("results", "read"),
    "load_model": ("modelspec", "load_model"),
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

