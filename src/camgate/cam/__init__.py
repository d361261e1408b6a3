"""CAM computation: native methods on the model's device, an adapter to pytorch-grad-cam, and
black-box methods (DE-CAM, RISE) that need only the model's outputs; per-detection maps for object
detectors (gradient engine and D-RISE); per-class maps for segmentation models and per-label maps for
multi-label classifiers (gradient engines, RISE / DE-CAM)."""
from .detection import DetectionCamEngine, DetectionMaps, fpn_reshape
from .drise import drise, drise_detections
from .engine import BLACKBOX, CamEngine, MethodError, canonical, methods
from .maps import CamBatch, minmax, normalized, upsample
from .methods import NATIVE
from .segmentation import (ClassMaps, MultiLabelCamEngine, SegmentationCamEngine, multilabel_blackbox,
                           segmentation_blackbox)

__all__ = ["BLACKBOX", "CamBatch", "CamEngine", "ClassMaps", "DetectionCamEngine", "DetectionMaps", "MethodError",
           "MultiLabelCamEngine", "NATIVE", "SegmentationCamEngine", "canonical", "drise", "drise_detections",
           "fpn_reshape", "methods", "minmax", "multilabel_blackbox", "normalized", "segmentation_blackbox",
           "upsample"]
