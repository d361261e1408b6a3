"""Run orchestration: model card + data -> maps -> metrics -> Parquet, batch by batch.

:func:`run` computes maps (and, with masks, the metrics) for every item, :func:`analyze` turns a
heatmaps file plus masks into results, :func:`run_layers` maps every layer, :func:`run_road` scores
the maps' faithfulness, and :mod:`.shards` splits, runs and merges a data set in parts. Every item
yields exactly one row; problems of the whole run raise before any compute.
"""
from .analysis import analyze
from .common import RunSummary, apply_metrics, parse_target
from .heatmaps import Runner, run
from .layers import run_layers
from .road import run_road

__all__ = ["Runner", "RunSummary", "analyze", "apply_metrics", "parse_target", "run", "run_layers", "run_road"]
