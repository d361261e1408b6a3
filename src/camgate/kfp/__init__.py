"""Kubeflow Pipelines (v2) face of camgate: components, the heatmap-gate pipeline, a local runner.

Needs the ``kfp`` extra (``pip install 'camgate[kfp]'``). The logic lives in ``camgate.steps``.
"""
from .components import (IMAGE, analyze_invalid_activation, animate_layers, compute_heatmaps, gate, layer_maps,
                         load_model, merge_results, plan_shards, promote, road_faithfulness, shard_worker)
from .pipelines import PipelineFailed, heatmap_gate, heatmap_gate_pipeline, local_run, promote_if_passed

__all__ = ["IMAGE", "load_model", "compute_heatmaps", "analyze_invalid_activation", "plan_shards", "shard_worker",
           "merge_results", "gate", "promote", "layer_maps", "animate_layers", "road_faithfulness",
           "heatmap_gate", "heatmap_gate_pipeline", "local_run", "promote_if_passed", "PipelineFailed"]
