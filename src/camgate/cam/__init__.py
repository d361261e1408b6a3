"""CAM computation: native methods on the model's device plus an adapter to pytorch-grad-cam."""
from .engine import CamBatch, CamEngine, MethodError, canonical, methods, minmax, normalized, upsample
from .methods import NATIVE

__all__ = ["CamBatch", "CamEngine", "MethodError", "NATIVE", "canonical", "methods", "minmax",
           "normalized", "upsample"]
