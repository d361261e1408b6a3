"""Every other pytorch-grad-cam method (ScoreCAM, AblationCAM, FullGrad, ...) by name.

These methods run their own forward/backward passes, so the adapter simply calls them. Their output
is what pytorch-grad-cam returns: min-max normalised and at input resolution, not a raw low-res map.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


def _classes() -> dict[str, type]:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.base_cam import BaseCAM

    return {name.lower().replace("_", ""): cls for name, cls in vars(pgc).items()
            if inspect.isclass(cls) and issubclass(cls, BaseCAM) and cls is not BaseCAM}


def available() -> list[str]:
    try:
        return sorted(_classes())
    except ImportError:
        return []


class AdapterCam:
    def __init__(self, model: nn.Module, layers: list[nn.Module], name: str, reshape_transform=None):
        cls = _classes().get(name.lower().replace("_", "").replace("-", ""))
        if cls is None:
            raise KeyError(name)
        self.cam = cls(model=model, target_layers=layers, reshape_transform=reshape_transform)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits, maps (B, H, W)) for the given target classes."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        model = self.cam.model
        frozen = [p for p in model.parameters() if not p.requires_grad]
        grads = {p: p.grad for p in model.parameters()}  # the caller's own gradients survive the call
        model.requires_grad_(True)  # these methods rely on parameter gradients (FullGrad) or hooks that need them
        try:
            with torch.enable_grad():
                maps = self.cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets.tolist()])
            logits = self.cam.outputs.detach()
        finally:
            self.cam.activations_and_grads.clear()
            for p, g in grads.items():
                p.grad = g
            for p in frozen:
                p.requires_grad_(False)
        return logits, torch.from_numpy(maps).to(x.device)

    def close(self):
        self.cam.activations_and_grads.release()
