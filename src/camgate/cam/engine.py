"""The CAM engine: one forward, gradients from the target score to the target activations only.

For the duration of a call the engine freezes the model's parameters (:func:`frozen_parameters`:
``requires_grad`` off on those that had it, the very same flags back afterwards, also when the call
raises; ``.grad`` is never touched), whether the caller froze the model or holds it trainable. Each
target activation is turned into a fresh autograd leaf by a forward hook. So nothing before the first
target layer records a graph (that part costs what inference costs), the backward pass covers only
score -> target layers, no parameter gradient is ever computed, and nothing of the graph outlives the
call. The model is otherwise left as it is (train/eval mode, buffers).

The hook hands that leaf itself on to the network, so the engine costs what a minimal hand-written
Grad-CAM costs. A network that writes into it in place further on (DenseNet's ReLU after `features`)
is caught, by autograd's refusal or by the activation's version counter, and that engine redoes the
batch and hands on a copy from then on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..settings import default
from . import adapter
from .blackbox import METHODS as BLACKBOX
from .maps import CamBatch, minmax, upsample
from .methods import ALIASES, NATIVE


class MethodError(ConfigError):
    """Unknown method, or a target layer the method cannot use."""


def canonical(method: str) -> str:
    m = method.lower().replace(" ", "")
    m = ALIASES.get(m, m)
    if m in NATIVE or m in BLACKBOX:
        return m
    key = m.replace("_", "").replace("-", "")
    if key in adapter.available():
        return key
    raise MethodError(f"unknown CAM method {method!r}; native: {sorted(NATIVE)}; "
                      f"via pytorch-grad-cam: {adapter.available()}; black-box: {sorted(BLACKBOX)}")


def methods() -> list[str]:
    return sorted(NATIVE) + [m for m in adapter.available() if m not in NATIVE] + sorted(BLACKBOX)


def _aggregate(maps: list[torch.Tensor]) -> torch.Tensor:
    """One layer: the raw map. Several: each scaled to [0, 1] (their magnitudes differ), brought to the
    finest resolution and averaged, as pytorch-grad-cam aggregates layers."""
    if len(maps) == 1:
        return maps[0]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    return torch.stack([upsample(minmax(m), tuple(size)) for m in maps]).mean(0)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off on every parameter of ``model`` that has it, for the ``with`` block only.

    A model as its user holds it (trainable) would otherwise record an autograd graph through every
    layer before the target and keep every weight on it. Afterwards exactly the parameters switched
    off are switched on again, also when the block raises; frozen ones stay frozen, ``.grad`` is
    never touched, nor is anything else of the model (train/eval mode, buffers).
    """
    switched = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in switched:
            p.requires_grad_(False)
        yield
    finally:
        for p in switched:
            p.requires_grad_(True)


def _is_leaf_inplace_error(e: RuntimeError) -> bool:
    # autograd's refusal to write into a leaf (or a view of one) that requires grad
    msg = str(e)
    return "leaf Variable that requires grad" in msg and "in-place operation" in msg


def forward_with_copies(engine, *args):
    """``engine._forward(*args)`` (call it with frozen parameters), done once more handing on copies of
    the target activations when an op downstream writes into one in place (DenseNet's ReLU after
    `features`, VGG's after a conv): autograd refuses the write into the leaf handed on, or
    ``_forward`` sees the activation's version move and returns None. ``engine._clone`` stays set, so
    the engine hands on copies from then on."""
    try:
        res = engine._forward(*args)
    except RuntimeError as e:  # autograd refused an in-place write into the leaf handed on
        if engine._clone or not _is_leaf_inplace_error(e):
            raise
        res = None
    if res is None and not engine._clone:
        engine._clone = True
        res = engine._forward(*args)
    if res is None:
        raise MethodError("the target activation was modified in place although the network got a copy")
    return res


def rank_grads(targets: list[list[torch.Tensor]], leaves: list[torch.Tensor],
               per_image: bool = False) -> list[list[list[torch.Tensor | None]]]:
    """grads[i][k][j]: gradient of image i's k-th target w.r.t. leaf j, image i's slice.

    One backward pass per rank k for all images: image i's slice of the gradient of the sum is its
    own target's gradient, because images do not interact (eval mode); ``per_image``: one pass per
    (image, rank), for a model whose images do interact in a batch. A rank whose targets do not read
    the model (an empty region, a box nothing matched) gets zero gradients (None)."""
    out: list[list[list[torch.Tensor | None]]] = [[] for _ in targets]
    jobs = []  # (images, k): one backward pass each
    most = max((len(t) for t in targets), default=0)
    for k in range(most):
        have = [i for i, t in enumerate(targets) if len(t) > k]
        jobs += [([i], k) for i in have] if per_image else [(have, k)]
    for n, (imgs, k) in enumerate(jobs):
        total = sum(targets[i][k] for i in imgs)
        if torch.is_tensor(total) and total.requires_grad:
            g = torch.autograd.grad(total.sum(), leaves, retain_graph=n < len(jobs) - 1, allow_unused=True)
        else:
            g = (None,) * len(leaves)
        for i in imgs:
            out[i].append([None if gj is None else gj[i:i + 1] for gj in g])
    return out


class CamEngine:
    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], method: str = default("method"),
                 reshape_transform: Callable | None = None):
        self.model, self.layers, self.reshape = model, list(layers), reshape_transform
        self.method = canonical(method)
        if self.method in BLACKBOX:  # they need no layers and run through camgate.cam.blackbox.explain
            raise MethodError(f"{self.method!r} is a black-box method: it is computed from outputs only, "
                              f"not by this layer engine")
        self.native = self.method in NATIVE
        self._clone = False  # hand the network a copy of the target activation (set on first need)
        self._adapter = None if self.native else adapter.AdapterCam(model, self.layers, self.method,
                                                                     reshape_transform)

    def _targets(self, logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        pred = logits.argmax(1)
        if target is None:
            return pred
        target = target.to(pred.device)
        return torch.where(target < 0, pred, target)  # -1 = explain the prediction

    def _forward(self, x, target, needs_grad):
        """One forward (+ backward); None when a downstream op modified a kept activation in place."""
        captured: list[torch.Tensor] = []
        versions: list[int] = []

        def hook(_module, _inputs, out):
            if not torch.is_tensor(out):
                raise MethodError(f"target layer {type(_module).__name__} returns {type(out).__name__}, not a tensor")
            act = out.detach()
            if needs_grad:
                # A leaf cut here keeps the upstream part graph-free; a layer downstream of another
                # target layer is already on the graph and stays connected so both get their gradients.
                act = out if out.requires_grad else act.requires_grad_(True)
            captured.append(act)
            versions.append(act._version)
            # The network goes on with act itself, as a minimal Grad-CAM does: a copy would cost time
            # and memory on every batch. Only an engine that met a downstream in-place op hands on a copy.
            return act.clone() if self._clone else act

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        try:
            with torch.set_grad_enabled(needs_grad):
                logits = self.model(x)
                if len(captured) != len(self.layers):
                    raise MethodError(f"expected each target layer to run once per forward, got "
                                      f"{len(captured)} activations for {len(self.layers)} layers")
                if any(a._version != v for a, v in zip(captured, versions)):
                    return None  # written in place where autograd does not object (no_grad, non-leaf)
                targets = self._targets(logits.detach(), target)
                grads: Sequence[torch.Tensor | None] = [None] * len(captured)
                if needs_grad:
                    score = logits.gather(1, targets[:, None]).sum()
                    grads = torch.autograd.grad(score, captured, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return logits, targets, captured, grads

    def __call__(self, x: torch.Tensor, target: torch.Tensor | None = None) -> CamBatch:
        """x: (B, 3, H, W) on the model's device; target: (B,) class index or -1 for predicted."""
        if not self.native:
            with torch.no_grad():
                logits = self.model(x)
            targets = self._targets(logits, target)
            _, cams = self._adapter(x, targets)
            return CamBatch(logits, targets, cams)
        fn, needs_grad = NATIVE[self.method]
        # Frozen parameters for the call: with trainable ones the forward would record a graph from
        # the first layer on (the hook's leaf cuts it only where out.requires_grad is False).
        with frozen_parameters(self.model):
            logits, targets, captured, grads = forward_with_copies(self, x, target, needs_grad)
        maps = []
        # maps in float32 whatever precision the model ran in (autocast): .float() is a no-op for
        # float32 activations, so full-precision runs are unchanged to the bit
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            for a, g in zip(captured, grads):
                a = a.detach().float()
                g = torch.zeros_like(a) if (g is None and needs_grad) else (None if g is None else g.float())
                if self.reshape is not None:
                    a = self.reshape(a)
                    g = self.reshape(g) if g is not None else None
                if a.ndim != 4:
                    raise MethodError(f"target activation has shape {tuple(a.shape)}; token layers need a "
                                      f"reshape transform (model card 'reshape: vit|swin')")
                maps.append(fn(a, g).clamp(min=0))
            cams = _aggregate(maps)
        return CamBatch(logits.detach(), targets, cams)

    def close(self):
        if self._adapter is not None:
            self._adapter.close()
