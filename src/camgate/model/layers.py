"""Target layers: the default per architecture, resolving dotted names, token reshapes for
transformers, and the dry forward that checks a layer gives one spatial map per forward.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ModelCardError


def default_detection_layers(model: nn.Module) -> list[str]:
    """A detector's default: the last block of the backbone's body (``backbone.body.layer4`` for a
    ResNet FPN detector; the last feature block of a MobileNet body), else the last block of the
    backbone's ``features`` (SSD: SSDlite runs the blocks one by one, never ``features`` itself)."""
    names = dict(model.named_modules())
    for parent in ("backbone.body", "backbone.features"):
        if parent in names:
            last = _last_child(parent, names)
            if last and last != parent:
                return [last]
    raise ModelCardError("no default target layer for this detector (no backbone.body, no backbone.features): "
                         "name the target layer")


def default_segmentation_layers(model: nn.Module, arch: str) -> list[str]:
    """A segmentation model's default: the backbone's last block (torchvision's FCN / DeepLabV3 on a
    ResNet: ``backbone.layer4``, as pytorch-grad-cam's segmentation tutorial; on a MobileNet, LR-ASPP
    included: its last feature block, ``backbone.16``); without a ``backbone`` the last conv block."""
    names = dict(model.named_modules())
    last = _last_child("backbone", names)
    if last and last != "backbone":
        return [last]
    return default_target_layers(model, arch)


def _last_conv_name(model: nn.Module) -> str:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = name
    if last is None:
        raise ModelCardError("no Conv2d in the model: give target_layer explicitly")
    return last


def default_target_layers(model: nn.Module, arch: str) -> list[str]:
    """The architecture's last convolutional block (what pytorch-grad-cam's docs recommend)."""
    name = arch.split("/")[-1].split(":")[-1].lower()
    names = dict(model.named_modules())
    candidates = [
        (("resnet", "resnext", "wide_resnet", "regnet"), lambda: _last_child("layer4", names) or "trunk_output"),
        (("densenet",), lambda: "features"),
        (("vit_",), lambda: f"{_last_child('encoder.layers', names)}.ln_1"),
        (("swin",), lambda: "features"),
        (("mobilenet", "efficientnet", "mnasnet", "convnext", "vgg", "alexnet", "squeezenet",
          "shufflenet", "googlenet", "inception"), lambda: _last_feature_block(names)),
    ]
    for prefixes, pick in candidates:
        if name.startswith(prefixes):
            layer = pick()
            if layer in names:
                return [layer]
    return [_last_conv_name(model)]


def _last_child(parent: str, names: dict) -> str | None:
    kids = [n for n in names if n.startswith(parent + ".") and n.count(".") == parent.count(".") + 1]
    return kids[-1] if kids else (parent if parent in names else None)


def _last_feature_block(names: dict) -> str | None:
    if "features" in names:
        return _last_child("features", names)
    return None


def resolve_layers(model: nn.Module, paths: Sequence[str | nn.Module]) -> list[nn.Module]:
    """Dotted paths -> modules (a module given passes as it is); a wrong path fails with the list of
    valid candidates."""
    names = dict(model.named_modules())
    out = []
    for p in paths:
        if isinstance(p, nn.Module):
            out.append(p)
            continue
        if p not in names or p == "":
            convs = [n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.Sequential)) and n]
            hint = ", ".join(convs[-12:])
            raise ModelCardError(
                f"target layer {p!r} is not a module of this model; candidates (last {min(12, len(convs))}"
                f" of {len(convs)} conv/sequential modules): {hint}")
        out.append(names[p])
    return out


def token_reshape(kind: str, grid: tuple[int, int] | None = None) -> Callable:
    """Token layer output -> map (B, C, h, w). Swin's is (B, h, w, C); ViT's is (B, N, C), N = the
    prefix tokens (class token, registers) followed by the h x w patch grid."""
    if kind == "swin":
        return lambda t: t.permute(0, 3, 1, 2)
    h, w = grid

    def vit(t: torch.Tensor) -> torch.Tensor:
        return t[:, t.shape[1] - h * w:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    return vit


def fpn_reshape(level: int | str = -1, absolute: bool = False) -> Callable:
    """A reshape transform for a layer returning an (ordered) dict of feature maps (torchvision's FPN):
    every level bilinearly resized to the size of ``level`` (an index into the dict's order or a key;
    -1 = the last, torchvision's 'pool', as pytorch-grad-cam's ``fasterrcnn_reshape_transform``) and
    concatenated along channels. ``absolute=True`` takes |x| first, as that example does (its maps
    then are EigenCAM's); for gradient methods leave it off: |gradient| loses the sign."""
    import torch.nn.functional as F

    def reshape(x) -> torch.Tensor:
        if torch.is_tensor(x):
            return x
        keys = list(x)
        size = x[keys[level] if isinstance(level, int) else level].shape[-2:]
        return torch.cat([F.interpolate(v.abs() if absolute else v, size, mode="bilinear") for v in x.values()], 1)

    return reshape


def vit_grid(model: nn.Module, n_tokens: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid behind ``n_tokens`` tokens: from the model's own patch size when it states one
    (torchvision ``patch_size``, timm ``patch_embed.patch_size``), else the grid with the input's
    aspect ratio that leaves the fewest prefix tokens."""
    H, W = input_size
    patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if (H // ph) * (W // pw) <= n_tokens:
            return H // ph, W // pw
    for prefix in range(0, 9):
        n = n_tokens - prefix
        h = max(1, round(math.sqrt(n * H / W)))
        if n > 0 and n % h == 0 and abs(h / (n // h) - H / W) < 0.25 * H / W:
            return h, n // h
    raise ModelCardError(f"cannot tell the patch grid of {n_tokens} tokens for a {H}x{W} input")


def token_kind(arch: str, layers: Sequence[str]) -> str | None:
    """torchvision ViT/Swin target layers emit tokens, not maps: pick the reshape for them."""
    name = arch.split("/")[-1] if arch.startswith("torchvision/") else ""
    if name.startswith("vit_") and all(l.startswith("encoder.") for l in layers):
        return "vit"
    if name.startswith("swin") and all(l.startswith("features") for l in layers):
        return "swin"
    return None


def _dry_forward(model: nn.Module, layers: Sequence[str], device, size) -> tuple[torch.Tensor, dict]:
    """One forward of a zero image with hooks on ``layers``: (output, {layer: [outputs per call]})."""
    seen: dict[str, list] = {name: [] for name in layers}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: seen[n].append(o)) for n in layers]
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *size, device=device))
    finally:
        for h in handles:
            h.remove()
    return out, seen


def spatial_layers(model: nn.Module, device, size) -> list[str]:
    """Modules that run once per forward and output a (B, C, h, w) map: the valid target layers."""
    names = [n for n, _ in model.named_modules() if n]
    _, seen = _dry_forward(model, names, device, size)
    return [n for n in names if len(seen[n]) == 1 and torch.is_tensor(seen[n][0]) and seen[n][0].ndim == 4]


def check_layers(model: nn.Module, layers: list[str], kind: str | None, device, size):
    """Validate every target layer with one dry forward; -> (the token reshape they need or None, output).

    A layer must run once per forward and give a tensor that is (or reshapes to) a spatial map; any
    other layer would turn every row into an error, so it is refused here, before data is read."""
    out, seen = _dry_forward(model, layers, device, size)

    def refuse(problem: str):
        cands = spatial_layers(model, device, size)
        raise ModelCardError(f"{problem}; candidates (last {min(12, len(cands))} of {len(cands)} modules giving a "
                             f"spatial map once per forward): {', '.join(cands[-12:])}")

    reshape = None
    for name in layers:
        calls = seen[name]
        if len(calls) != 1:
            refuse(f"target layer {name!r} runs {len(calls)} times in one forward, not once")
        a = calls[0]
        if kind == "fpn" and isinstance(a, dict) and a and all(torch.is_tensor(v) and v.ndim == 4 for v in a.values()):
            reshape = fpn_reshape()
            continue
        if not torch.is_tensor(a):
            if isinstance(a, dict):
                refuse(f"target layer {name!r} returns a dict of feature maps (an FPN): set 'reshape: fpn' in "
                       f"the model card")
            refuse(f"target layer {name!r} returns a {type(a).__name__}, not a tensor")
        if kind == "vit" and a.ndim == 3:
            reshape = token_reshape("vit", vit_grid(model, a.shape[1], size))
        elif kind == "swin" and a.ndim == 4:
            reshape = token_reshape("swin")
        elif kind and a.ndim in (3, 4):
            refuse(f"target layer {name!r} gives shape {tuple(a.shape)}, which 'reshape: {kind}' cannot map")
        shaped = reshape(a) if reshape else a
        if shaped.ndim != 4:
            hint = " (token layers need 'reshape: vit' or 'swin' in the model card)" if a.ndim == 3 else ""
            refuse(f"target layer {name!r} gives shape {tuple(a.shape)}, not a spatial map (B, C, h, w){hint}")
    return reshape, out
