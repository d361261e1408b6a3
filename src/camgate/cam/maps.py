"""Maps as tensors: the engine's output type and the resizing and scaling every consumer shares.

Kept apart from the engine so black-box methods (:mod:`.blackbox`) and the engine use one
``CamBatch`` without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CamBatch:
    logits: torch.Tensor   # (B, K)
    targets: torch.Tensor  # (B,) class whose score was explained
    cams: torch.Tensor     # (B, h, w) raw ReLU'd map (native) / normalised map (adapter)


def minmax(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map min-max scaling, the way pytorch-grad-cam does it (x - min) / (max + eps)."""
    flat = x.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    return (flat / (flat.max(1, keepdim=True).values + eps)).view_as(x)


def upsample(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear with half-pixel centres (align_corners=False)."""
    if tuple(cams.shape[-2:]) == tuple(size):
        return cams
    return F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalized(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The display view: min-max, bilinear upsampling, min-max (pytorch-grad-cam's output)."""
    return minmax(upsample(minmax(cams), size))
