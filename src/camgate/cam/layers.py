"""CAMs of every layer of a CNN from ONE forward and ONE backward pass (CAManim, Kaczmarek et al. 2024).

Design decisions:

* Which module calls become frames (:func:`plan_layers`) is decided from one dry forward (no grad)
  with a hook on every module. A frame is one *call* of a module, keyed ``(name, call index)``:
  ResNet's BasicBlock applies its one ``relu`` twice, and the two outputs are different maps
  (shown as ``layer1.0.relu`` and ``layer1.0.relu#1``). Skipped, each with its reason:

  - the root module (its output is the logits);
  - outputs that are not maps: not a tensor, tuples/lists/dicts, not 4-D, not floating point, or a
    batch dimension other than the input's (e.g. ``fc``/``classifier`` giving ``(B, K)``);
  - 1x1 maps (global pooling, squeeze-excitation convolutions): a single value per channel has no
    spatial information, and min-max scaling turns it into an all-zero frame;
  - duplicates: an output that is the very tensor (same storage, view and version counter, i.e. same
    values) another module call produced before it. That covers containers returning their last
    child's output (``layer1``, DenseNet's ``features``), ``Identity`` and eval-mode
    ``Dropout``/``StochasticDepth``. A container whose output shares storage with a child's but was
    changed in place after it (``result += input`` in an MBConv block) is *not* a duplicate: its
    version counter moved on, so its map differs and it stays.

* :func:`layer_maps` hooks every selected call. The first captured output is turned into a fresh
  autograd leaf (the parameters are frozen for the call by :func:`.engine.frozen_parameters`, their
  flags restored after), so the backward pass reaches exactly the captured layers and nothing of
  the model's weights. A hook hands the network a *clone* to go on
  with wherever the dry forward saw the output modified in place later (``ReLU(inplace=True)``
  after BatchNorm, ``out += identity``): the copy is modified, never the activation explained.
  Outputs nothing touched are handed on as they are (no copy, ~40 % less memory on ResNet-50); their
  version counters are checked after the forward, and should one have changed after all (code that
  acts differently with gradients on), the pass is redone with copies everywhere. A gradient hook
  on each captured tensor turns (activation, gradient) into the layer's small map as soon as the
  backward pass reaches it and drops the activation, so gradients are never held for all layers at
  once.

  Peak memory: every selected activation, plus what the graph saves for the backward pass from the
  first selected layer on (about a training forward without weight gradients), plus copies of the
  outputs modified in place. Measured: ResNet-50, 224 px: ~125 MB per image over the baseline, vs
  ~10 MB for a single Grad-CAM. Gradients are transient. Without a gradient (EigenCAM) each map is
  computed in the forward hook and no activation is kept at all. For big models or batches, call it
  on fewer images at a time (the maps themselves are small).

* The model should be in eval mode: the dry forward of :func:`plan_layers` would otherwise update
  BatchNorm statistics. Outputs the caller ignores in favour of an in-place-modified input (code that
  calls ``self.relu(x)`` without using its result) cannot be protected by a hook.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..settings import default
from .engine import MethodError, canonical, frozen_parameters
from .maps import minmax
from .methods import NATIVE


@dataclass
class LayerRef:
    name: str   # module name as in named_modules()
    call: int   # 0 for the first call of that module in a forward, 1 for the second, ...
    index: int  # position in the plan (frame number)
    # labels of the other module calls whose output is this very tensor (a container ending in this
    # module, an Identity): the frame answers to those names too (`layer3` for `layer3.1.relu#1`)
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name}#{self.call}"


@dataclass
class LayerPlan:
    layers: list[LayerRef]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, reason), forward order
    # (name, call) of layers whose output nothing modified in place later in the dry forward:
    # layer_maps hands those on to the network without a copy
    unmodified: frozenset = frozenset()

    def names(self) -> list[str]:
        return [r.label for r in self.layers]

    def aliases(self) -> dict[str, list[str]]:
        """Frame label -> the other names it answers to (only frames that have some)."""
        return {r.label: list(r.aliases) for r in self.layers if r.aliases}


@dataclass
class LayerMaps:
    logits: Tensor           # (B, K)
    targets: Tensor          # (B,) class explained
    maps: list[Tensor]       # per plan layer: (B, h_l, w_l) raw ReLU'd map
    layers: list[LayerRef]
    unreached: list[LayerRef]  # layers the score's gradient did not reach: their maps are all zero


def _label(name: str, call: int) -> str:
    return name if call == 0 else f"{name}#{call}"


def _reason(out, batch: int) -> str | None:
    """Why ``out`` is not a (B, C, h, w) spatial map, or None when it is."""
    if not torch.is_tensor(out):
        return f"output is a {type(out).__name__}, not a tensor"
    if out.ndim != 4:
        return f"output shape {tuple(out.shape)} is not a (B, C, h, w) map"
    if not out.is_floating_point():
        return f"output dtype {out.dtype} is not floating point"
    if out.shape[0] != batch:
        return f"output batch {out.shape[0]} differs from the input's {batch}"
    if out.shape[2] * out.shape[3] == 1:
        return "1x1 map: no spatial information"
    return None


def _key(t: Tensor) -> tuple:
    # Same storage, same view, same version: the same values (an in-place op bumps _version).
    return (t.data_ptr(), tuple(t.shape), t.stride(), t._version)


def plan_layers(model: nn.Module, example: Tensor, select: str | list[str] = "all") -> LayerPlan:
    """Frames for ``model`` from one dry forward of ``example`` (see the module docstring for the policy).

    ``select``: ``"all"``, or names (a list, or one comma-separated string). A plain module name takes
    every call of that module, ``name#k`` one call; a module whose output is another call's tensor (a
    container, an Identity) selects that frame, which answers to both names (``LayerRef.aliases``).
    An unknown name raises :class:`ConfigError` listing the selectable names; a skipped one raises it
    with the reason it was skipped.

    The dry forward keeps every module's output of ``example`` alive until it ends (so no storage is
    reused under a recorded identity): give it one image. ``plan.unmodified`` is what it saw of
    in-place modifications, for :func:`layer_maps`; a hand-made plan without it copies every output.
    """
    root = model
    calls: dict[nn.Module, int] = {}
    records: list[tuple[str, int, str | None]] = []  # (name, call, skip reason or None)
    versions: dict[tuple[str, int], tuple[Tensor, int]] = {}  # kept layers: (output, version then)
    seen: dict[tuple, str] = {}  # tensor key -> label of the first call that produced it
    aliases: dict[str, list[str]] = {}  # that label -> the later calls that returned the same tensor
    keep: list[Tensor] = []  # held so no storage is freed and reused under a recorded key
    batch = example.shape[0]

    def hook_for(name: str):
        def hook(module, _inputs, out):
            call = calls.get(module, 0)
            calls[module] = call + 1
            reason = "root module (its output is the logits)" if module is root else _reason(out, batch)
            if torch.is_tensor(out) and out.layout == torch.strided:
                k = _key(out)
                if reason is None and k in seen:
                    reason = f"same tensor as {seen[k]}'s output (duplicate frame)"
                    aliases.setdefault(seen[k], []).append(_label(name, call))
                seen.setdefault(k, _label(name, call))
                keep.append(out)
            records.append((name, call, reason))
            if reason is None:
                versions[(name, call)] = (out, out._version)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(example)
        unmodified = frozenset(k for k, (t, v) in versions.items() if t._version == v)
    finally:
        for h in handles:
            h.remove()
        keep.clear()
        versions.clear()

    layers = [LayerRef(n, c, -1, tuple(aliases.get(_label(n, c), ()))) for n, c, r in records if r is None]
    skipped = [(_label(n, c), r) for n, c, r in records if r is not None]
    if select != "all":
        layers = _select(layers, skipped, select)
    for i, ref in enumerate(layers):
        ref.index = i
    return LayerPlan(layers, skipped, unmodified)


def _select(layers: list[LayerRef], skipped: list[tuple[str, str]], select: str | list[str]) -> list[LayerRef]:
    names = [s.strip() for s in select.split(",")] if isinstance(select, str) else list(select)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("no layers selected; give 'all' or layer names")
    why = dict(skipped)
    wanted: set[tuple[str, int]] = set()
    for n in names:
        hits = [(r.name, r.call) for r in layers
                if n in (r.label, r.name) or any(n in (a, a.split("#")[0]) for a in r.aliases)]
        if not hits:
            if n in why:
                raise ConfigError(f"layer {n!r} has no frame of its own: {why[n]}")
            raise ConfigError(f"unknown layer {n!r}; selectable: {', '.join(r.label for r in layers)}")
        wanted.update(hits)
    return [r for r in layers if (r.name, r.call) in wanted]  # forward order, each once


def _targets(logits: Tensor, targets) -> Tensor:
    pred = logits.argmax(1)
    if targets is None:
        return pred
    t = torch.as_tensor(targets, device=pred.device).reshape(-1).expand_as(pred)
    return torch.where(t < 0, pred, t)  # -1 = explain the prediction


def layer_maps(model: nn.Module, x: Tensor, plan: LayerPlan, method: str = default("method"),
               targets=None) -> LayerMaps:
    """Raw maps of every plan layer for ``x`` (B, 3, H, W) from one forward and one backward pass.

    ``method``: any native method (:data:`camgate.cam.methods.NATIVE`). ``targets``: (B,) class
    indices (or one int), -1 = the predicted class; None = predicted for all.
    """
    method = canonical(method)
    if method not in NATIVE:
        raise MethodError(f"{method!r} runs only through pytorch-grad-cam, one layer per pass; "
                          f"layer animations take a native method: {sorted(NATIVE)}")
    fn, needs_grad = NATIVE[method]
    modules = dict(model.named_modules())
    slots: dict[tuple[str, int], int] = {}
    for i, ref in enumerate(plan.layers):
        if ref.name not in modules:
            raise ConfigError(f"plan layer {ref.name!r} is not a module of this model")
        slots[(ref.name, ref.call)] = i
    handles = []
    # Frozen parameters for the call (the flags come back as they were): no graph before the first
    # captured layer, no weight on the graph, whether the caller froze the model or not.
    try:
        with frozen_parameters(model):
            state = _one_pass(model, x, plan, slots, fn, needs_grad, targets, handles, copy_all=False)
            if state is None:  # an output the dry forward left alone was modified in place after all
                state = _one_pass(model, x, plan, slots, fn, needs_grad, targets, handles, copy_all=True)
    finally:
        for h in handles:
            h.remove()
    logits, tgt, maps, acts = state
    unreached = []
    for i, ref in enumerate(plan.layers):
        if maps[i] is None:  # the score does not depend on this layer
            a = acts[i]
            maps[i] = torch.zeros(a.shape[0], *a.shape[2:], dtype=a.dtype, device=a.device)
            unreached.append(ref)
    return LayerMaps(logits.detach(), tgt, maps, list(plan.layers), unreached)


def _one_pass(model, x, plan, slots, fn, needs_grad, targets, handles, copy_all):
    """One forward + one backward; None when a layer handed on uncopied was modified in place."""
    n = len(plan.layers)
    maps: list[Tensor | None] = [None] * n
    acts: list[Tensor | None] = [None] * n
    versions: dict[int, int] = {}  # layers handed on without a copy: version when captured
    calls: dict[str, int] = {}
    called = [False] * n

    def compute(i: int, a: Tensor, g: Tensor | None) -> None:
        with torch.no_grad():
            maps[i] = fn(a.detach(), g).clamp(min=0)

    def grad_hook(i: int):
        def hook(g):
            compute(i, acts[i], g)
            acts[i] = None  # the map is all we keep of this layer
        return hook

    def hook_for(name: str):
        def hook(module, _inputs, out):
            call = calls.get(name, 0)
            calls[name] = call + 1
            i = slots.get((name, call))
            if i is None:
                return None
            called[i] = True
            if _reason(out, x.shape[0]) is not None:
                raise ConfigError(f"plan layer {plan.layers[i].label}: {_reason(out, x.shape[0])}; "
                                  f"was the plan made for another model?")
            if not needs_grad:
                compute(i, out, None)  # before anything downstream can modify it
                return None
            # Downstream of an earlier captured layer the output is on the graph already and stays
            # connected; otherwise it becomes a leaf, so nothing upstream records a graph.
            act = out if out.requires_grad else out.detach().requires_grad_(True)
            act.register_hook(grad_hook(i))
            acts[i] = act
            if copy_all or (name, call) not in plan.unmodified:
                return act.clone()  # the network goes on with a copy: in-place ops cannot touch act
            versions[i] = act._version  # shared with the network: checked after the forward
            return act
        return hook

    for h in handles:
        h.remove()
    handles.clear()
    modules = dict(model.named_modules())
    handles += [modules[name].register_forward_hook(hook_for(name)) for name in {r.name for r in plan.layers}]
    with torch.set_grad_enabled(needs_grad):
        try:
            logits = model(x.detach())
        except RuntimeError:
            if copy_all:  # e.g. an in-place op on an uncopied leaf: retry with copies
                raise
            return None
        missing = [ref.label for ref, c in zip(plan.layers, called) if not c]
        if missing:
            raise ConfigError(f"plan layers not called in this forward: {missing}")
        if any(acts[i]._version != v for i, v in versions.items()):
            return None
        tgt = _targets(logits.detach(), targets)
        if needs_grad and logits.requires_grad:
            leaves = [a for a in acts if a is not None and a.is_leaf]
            score = logits.gather(1, tgt[:, None]).sum()
            # Results are discarded: the gradient hooks have turned every gradient into a map.
            torch.autograd.grad(score, leaves, allow_unused=True)
    return logits, tgt, maps, acts


def normalise(maps: list[Tensor], mode: str = "layer", q: float = 0.995) -> list[Tensor]:
    """Raw (B, h_l, w_l) maps -> [0, 1], per image.

    ``layer``: each map min-max scaled on its own (pytorch-grad-cam's scaling), so every frame uses
    the full colour range. ``global``: one range per image over the raw values of all its layers:
    from the smallest value to the ``q`` quantile (99.5 %) of all of them, then clipped to [0, 1].
    The quantile, not the maximum, so a few extreme pixels do not darken every other frame; raw
    values, never pre-scaled maps, so a layer with weak evidence stays dark. Every pixel counts once,
    so high-resolution layers weigh more in the range.
    """
    if mode == "layer":
        return [minmax(m) for m in maps]
    if mode != "global":
        raise ConfigError(f"normalisation must be 'global' or 'layer', got {mode!r}")
    if not maps:
        return []
    flat = torch.cat([m.flatten(1).float() for m in maps], 1)  # (B, total pixels)
    lo = flat.min(1).values
    k = max(1, min(flat.shape[1], round(q * flat.shape[1])))
    hi = flat.kthvalue(k, dim=1).values  # no size limit, unlike torch.quantile
    span = (hi - lo).clamp(min=1e-12)[:, None, None]
    return [((m.float() - lo[:, None, None]) / span).clamp(0, 1).to(m.dtype) for m in maps]
