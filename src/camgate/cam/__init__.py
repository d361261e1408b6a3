"""CAM computation: native methods on the model's device, an adapter to pytorch-grad-cam, and
black-box methods (DE-CAM, RISE) that need only the model's outputs; per-detection maps for object
detectors (gradient engine and D-RISE)."""
from .detection import DetectionCamEngine, DetectionMaps, fpn_reshape
from .drise import drise, drise_detections
from .engine import BLACKBOX, CamEngine, MethodError, canonical, methods
from .maps import CamBatch, minmax, normalized, upsample
from .methods import NATIVE

__all__ = ["BLACKBOX", "CamBatch", "CamEngine", "DetectionCamEngine", "DetectionMaps", "MethodError", "NATIVE",
           "canonical", "drise", "drise_detections", "fpn_reshape", "methods", "minmax", "normalized", "upsample"]
