"""Native CAM methods: each one small function of (activations, gradients) -> map, all (B, C, h, w).

Formulas follow pytorch-grad-cam (the reference implementation) so results are comparable;
they run in torch on the model's device instead of numpy on the host.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _weighted(weights: Tensor, acts: Tensor) -> Tensor:
    return (weights[:, :, None, None] * acts).sum(1)


def _spatial_sum(a: Tensor) -> Tensor:
    # Summed in float64: for LayerNorm'd tokens (ViT) a channel's sum can be ~1e-3 against values ~1,
    # and XGradCAM / GradCAM++ divide by it, so float32 cancellation would show in the map.
    return a.sum((2, 3), keepdim=True, dtype=torch.float64).to(a.dtype)


def gradcam(a: Tensor, g: Tensor) -> Tensor:
    return _weighted(g.mean((2, 3)), a)


def gradcam_pp(a: Tensor, g: Tensor) -> Tensor:
    g2 = g * g
    aij = g2 / (2 * g2 + _spatial_sum(a) * g2 * g + 1e-6)
    aij = torch.where(g != 0, aij, torch.zeros_like(aij))
    return _weighted((g.clamp(min=0) * aij).sum((2, 3)), a)


def xgradcam(a: Tensor, g: Tensor) -> Tensor:
    return _weighted((g * a / (_spatial_sum(a) + 1e-7)).sum((2, 3)), a)


def hirescam(a: Tensor, g: Tensor) -> Tensor:
    return (g * a).sum(1)


def gradcam_elementwise(a: Tensor, g: Tensor) -> Tensor:
    return (g * a).clamp(min=0).sum(1)


def layercam(a: Tensor, g: Tensor) -> Tensor:
    return (g.clamp(min=0) * a).sum(1)


def first_component(x: Tensor) -> Tensor:
    """Projection of each pixel's channel vector on the first principal direction (B, C, h, w) -> (B, h, w).

    The sign of a singular vector is arbitrary (numpy and torch, or two LAPACK builds, disagree), so
    a map is flipped when |min| > |max|, as pytorch-grad-cam's sign-corrected projection does: the
    salient region comes out positive and the result is reproducible.
    """
    b, c, h, w = x.shape
    flat = torch.nan_to_num(x).reshape(b, c, h * w).transpose(1, 2)  # (B, hw, C)
    flat = flat - flat.mean(1, keepdim=True)
    vh = torch.linalg.svd(flat, full_matrices=False).Vh  # (B, k, C)
    proj = (flat @ vh[:, 0, :, None])[..., 0]
    flip = proj.min(1).values.abs() > proj.max(1).values.abs()
    return torch.where(flip[:, None], -proj, proj).reshape(b, h, w)


def eigencam(a: Tensor, g: Tensor | None) -> Tensor:
    return first_component(a)


def eigengradcam(a: Tensor, g: Tensor) -> Tensor:
    return first_component(g * a)


# name -> (function, needs gradients)
NATIVE = {
    "gradcam": (gradcam, True),
    "gradcam++": (gradcam_pp, True),
    "xgradcam": (xgradcam, True),
    "hirescam": (hirescam, True),
    "layercam": (layercam, True),
    "eigencam": (eigencam, False),
    "eigengradcam": (eigengradcam, True),
    "gradcamelementwise": (gradcam_elementwise, True),
}
ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam": "gradcam",
           "gradcam_elementwise": "gradcamelementwise"}
