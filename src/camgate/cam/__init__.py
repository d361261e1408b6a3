"""CAM computation: native methods on the model's device, an adapter to pytorch-grad-cam, and
black-box methods (DE-CAM, RISE) that need only the model's outputs."""
from .engine import BLACKBOX, CamEngine, MethodError, canonical, methods
from .maps import CamBatch, minmax, normalized, upsample
from .methods import NATIVE

__all__ = ["BLACKBOX", "CamBatch", "CamEngine", "MethodError", "NATIVE", "canonical", "methods", "minmax",
           "normalized", "upsample"]
