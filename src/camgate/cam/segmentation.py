"""Per-class maps for semantic segmentation models and per-label maps for multi-label classifiers.

Segmentation (a model returning per-pixel class scores (B, K, H, W)): the map of class c explains
its scores summed over its region R, ``(scores[c] * R).sum()``, as pytorch-grad-cam's
``SemanticSegmentationTarget`` defines it. R is the set of pixels predicted as c (argmax over K), or
a region the caller gives (a ground-truth label map or boolean masks), at the model output's
resolution. A class with an empty region has nothing to explain: its row gets status ``no_region``,
the reason, and an all-zero map (never an error).

Multi-label (a classifier whose (B, K) outputs are independent sigmoid logits): one map per positive
label (sigmoid >= ``threshold``) or per given label, explaining that label's logit (pytorch-grad-cam's
``ClassifierOutputTarget(label)`` on the raw output).

Gradient engines (:class:`SegmentationCamEngine`, :class:`MultiLabelCamEngine`) run ONE forward per
batch and one backward per target rank: the k-th targets of all images share a backward pass (images
do not interact in eval mode, so each image's slice of the gradient of the sum is its own target's),
as :class:`camgate.cam.detection.DetectionCamEngine` does per detection rank. Parameters are frozen
and target activations cut into autograd leaves as in :class:`camgate.cam.engine.CamEngine`; maps come
from the same native method functions (:data:`camgate.cam.methods.NATIVE`).

Black boxes (:func:`segmentation_blackbox`, :func:`multilabel_blackbox`) reuse RISE and DE-CAM
(:mod:`camgate.cam.blackbox`) on a target score: the mean over the clean image's region of the class's
softmax probability (segmentation), or the label's sigmoid probability (multi-label). One clean pass
per image, then RISE: ``budget`` masked passes per image, all its targets scored on the same masks;
DE-CAM: ``budget`` per (image, target) (its search follows one target). Seeds as in RISE/DE-CAM: per
image, so a map does not depend on the rest of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..model.backends import check_scores, output_scores
from ..settings import default
from .blackbox import METHODS as BLACKBOX
from .detection import _to_leaf
from .engine import MethodError, _aggregate, canonical, forward_with_copies, frozen_parameters, rank_grads
from .maps import normalized
from .methods import NATIVE

NO_REGION = "no_region"
THRESHOLD = 0.5  # a multi-label's positive: sigmoid(logit) >= 0.5, i.e. logit >= 0


@dataclass
class ClassMaps:
    """One image's explained classes (segmentation) or labels (multi-label) and their maps."""
    classes: Tensor      # (T,) int64 class / label explained (results: target_class), CPU
    maps: Tensor         # (T, h, w) raw maps >= 0, float32, on the model's / x's device; all zero unless 'ok'
    #                      (gradient engines: feature resolution; RISE: input resolution; DE-CAM: its grid)
    targets: Tensor      # (T,) the value explained: class scores summed over the region / the label's logit
    scores: Tensor       # (T,) mean softmax probability over the region (NaN when empty) / sigmoid probability
    status: list[str]    # per row 'ok' | 'no_region'
    reasons: list[str]   # per row '' or why there is no map
    regions: Tensor | None  # (T, H, W) bool at the model output's resolution (segmentation), CPU
    image_size: tuple[int, int]  # (H, W) of the model input
    note: str = ""       # why no target at all was explained ('' when T > 0)

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def normalized(self, size: tuple[int, int] | None = None) -> Tensor:
        """(T, H, W) display maps: min-max, bilinear to the input size (or ``size``), min-max."""
        if not len(self):
            return self.maps.new_zeros((0, *(size or self.image_size)))
        return normalized(self.maps, tuple(size or self.image_size))


# --- which targets -----------------------------------------------------------------------------------

def check_class_ids(ids, num_classes: int, what: str = "class") -> list[int]:
    """Class / label ids -> a list of ints, each in 0..K-1; otherwise a ConfigError naming the id."""
    out = [int(c) for c in torch.as_tensor(ids).reshape(-1).tolist()]
    for c in out:
        if not 0 <= c < num_classes:
            raise ConfigError(f"{what} {c} is outside the model's {num_classes} classes (0 to {num_classes - 1})")
    return out


def classes_present(labels: Tensor, num_classes: int, min_pixels: int = 1, ignore: Sequence[int] = ()) -> list[int]:
    """The classes with at least ``min_pixels`` pixels in a label map (H, W) (a prediction's argmax or a
    ground truth), ascending, without ``ignore`` (e.g. background). Ids outside 0..K-1 are void pixels
    (255 by the VOC convention) and never a class."""
    flat = labels.reshape(-1).long()
    flat = flat[(flat >= 0) & (flat < num_classes)]
    counts = torch.bincount(flat.cpu(), minlength=num_classes)
    skip = set(check_class_ids(list(ignore), num_classes, "ignored class"))
    return [c for c in range(num_classes) if int(counts[c]) >= max(1, int(min_pixels)) and c not in skip]


def _fit(region: Tensor, size: tuple[int, int]) -> Tensor:
    """A given region or label map -> the model output's size (nearest neighbour, as masks are resized)."""
    if tuple(region.shape[-2:]) == tuple(size):
        return region
    lead = region.shape[:-2]
    r = F.interpolate(region.reshape(1, -1, *region.shape[-2:]).float(), size=size, mode="nearest-exact")
    return r.reshape(*lead, *size).to(region.dtype)


def segmentation_rows(pred: Tensor, num_classes: int, classes=None, region=None, min_pixels: int = 1,
                      ignore: Sequence[int] = ()) -> tuple[list[int], Tensor, list[str], list[str], str]:
    """One image's rows: (classes, regions (T, H, W) bool, status, reasons, note).

    ``pred`` (H, W): the predicted class per pixel. ``region``: None (each class's region = its predicted
    pixels), an integer label map (H', W') (e.g. the ground truth; region of c = pixels labelled c), or
    bool masks (T, H', W') aligned with ``classes``; resized nearest-neighbour to (H, W) when they differ.
    ``classes``: the ones to explain; default those present (``min_pixels``, ``ignore``) in ``region``'s
    label map, else in the prediction."""
    size = tuple(pred.shape[-2:])
    where = "predicted"
    if region is not None:
        stacked = torch.stack([torch.as_tensor(r) for r in region]) if isinstance(region, (list, tuple)) else region
        region = torch.as_tensor(stacked).to(pred.device)
        where = "given"
    if region is not None and region.dtype == torch.bool:
        if region.ndim == 2:
            region = region[None]
        if classes is None or region.ndim != 3 or region.shape[0] != len(check_class_ids(classes, num_classes)):
            raise ConfigError(f"boolean regions of shape {tuple(region.shape)} need one (H, W) mask per class "
                              f"given in classes ({'none' if classes is None else len(list(classes))} given)")
        regions = _fit(region, size)
        cls = check_class_ids(classes, num_classes)
    else:
        labels = pred if region is None else _fit(region.long(), size)
        if labels.ndim != 2:
            raise ConfigError(f"a region label map must be (H, W), got shape {tuple(labels.shape)}")
        cls = (classes_present(labels, num_classes, min_pixels, ignore) if classes is None
               else check_class_ids(classes, num_classes))
        regions = labels[None] == torch.tensor(cls, dtype=labels.dtype, device=labels.device)[:, None, None]
    pixels = regions.flatten(1).sum(1).tolist() if len(cls) else []
    status = ["ok" if n else NO_REGION for n in pixels]
    reasons = ["" if n else f"class {c} has no pixel in the {where} region" for c, n in zip(cls, pixels)]
    note = "" if cls else "no class given" if classes is not None else (
        f"no class with at least {max(1, int(min_pixels))} pixel(s) in the {where} region"
        + (f" besides the ignored {sorted(set(ignore))}" if ignore else ""))
    return cls, regions.reshape(len(cls), *size), status, reasons, note


def multilabel_rows(probs: Tensor, labels=None, threshold: float = THRESHOLD) -> tuple[list[int], str]:
    """One image's labels to explain: those given (checked), else those with sigmoid >= ``threshold``."""
    k = probs.shape[-1]
    if labels is not None:
        return check_class_ids(labels, k, "label"), ""
    pos = (probs >= threshold).nonzero().flatten().tolist()
    top = int(probs.argmax())
    note = "" if pos else f"no label scores >= {threshold} (highest: label {top}, {float(probs[top]):.3g})"
    return pos, note


def _per_image(arg, n: int, what: str) -> list:
    if arg is None:
        return [None] * n
    arg = list(arg)
    if len(arg) != n:
        raise ConfigError(f"{len(arg)} {what} for {n} images")
    return arg


def _check_lists(lists: list, num_classes: int | None, what: str) -> None:
    """Per-image id lists checked up front when K is known (a wrong id fails before any forward)."""
    for ids in lists if num_classes else ():
        if ids is not None:
            check_class_ids(ids, num_classes, what)


# --- gradient engines ----------------------------------------------------------------------------------

class _TargetEngine:
    """One forward, one backward per target rank, maps by a native method; subclasses pick the targets."""

    task = "?"

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str], method: str = "gradcam",
                 reshape_transform: Callable | None = None, num_classes: int | None = None):
        from ..model.layers import resolve_layers

        self.model, self.num_classes = model, num_classes  # K checked against every output when given
        self.layers = resolve_layers(model, target_layers)
        if not self.layers:
            raise MethodError("give at least one target layer")
        self.method = canonical(method)
        if self.method not in NATIVE:
            raise MethodError(f"{self.task} maps support the native methods {sorted(NATIVE)}, not {self.method!r}")
        self.fn, self.needs_grad = NATIVE[self.method]
        self.reshape = reshape_transform
        self._clone = False

    def close(self) -> None:
        """Nothing to release: hooks live for one call only."""

    def _forward(self, x: Tensor):
        captured: list[Tensor] = []
        versions: list[int] = []

        def hook(_module, _inputs, out):
            handed, keys, leaves = _to_leaf(out, self.needs_grad, self._clone)
            if keys is not None:
                raise MethodError("the target layer returns a dict of feature maps: name a layer giving a tensor")
            captured.append(leaves[0])
            versions.append(leaves[0]._version)
            return handed

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        try:
            with torch.set_grad_enabled(self.needs_grad):
                out = output_scores(self.model(x))
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(self.layers):
            raise MethodError(f"expected each target layer to run once per forward, got {len(captured)} "
                              f"activations for {len(self.layers)} layers")
        if any(a._version != v for a, v in zip(captured, versions)):
            return None  # written in place downstream: redo with copies
        return out, captured

    def _run(self, x: Tensor, choose) -> list[ClassMaps]:
        with frozen_parameters(self.model):
            out, leaves = forward_with_copies(self, x)
            k = self.num_classes or (out.shape[1] if out.ndim > 1 else 0)
            check_scores(out, self.task, k, "the model", x.shape[0], MethodError)
            rows = choose(out)  # per image: (classes, targets [scalar tensors], scores, status, reasons, regions, note)
            grads = rank_grads([r[1] for r in rows], leaves) if self.needs_grad else None
            return self._maps(x, rows, leaves, grads)

    def _maps(self, x: Tensor, rows, leaves, grads) -> list[ClassMaps]:
        results = []
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            for i, (cls, targets, scores, status, reasons, regions, note) in enumerate(rows):
                n = len(cls)
                per_layer = []
                for j, leaf in enumerate(leaves):
                    a = leaf[i:i + 1].detach().float()
                    a = self.reshape(a) if self.reshape is not None else a
                    if a.ndim != 4:
                        raise MethodError(f"target activation has shape {tuple(a.shape)}; token layers need a "
                                          f"reshape transform (model card 'reshape: vit|swin')")
                    if not n:
                        per_layer.append(a.new_zeros((0, *a.shape[-2:])))
                    elif not self.needs_grad:
                        per_layer.append(self.fn(a, None).clamp(min=0).expand(n, -1, -1))
                    else:
                        g = [torch.zeros_like(leaf[i:i + 1], dtype=torch.float32) if gk[j] is None else gk[j].float()
                             for gk in grads[i]]
                        g = torch.cat([self.reshape(t) if self.reshape is not None else t for t in g])
                        per_layer.append(self.fn(a.expand_as(g), g).clamp(min=0))
                maps = _aggregate(per_layer) if n else per_layer[0]
                ok = torch.tensor([s == "ok" for s in status], dtype=torch.bool, device=maps.device)
                maps = torch.where(ok[:, None, None], maps, torch.zeros_like(maps)).float()
                vals = torch.stack([t.detach().float().reshape(()) for t in targets]).cpu() if n else torch.zeros(0)
                results.append(ClassMaps(torch.tensor(cls, dtype=torch.long), maps, vals, scores, status, reasons,
                                         regions, tuple(x.shape[-2:]), note))
        return results


class SegmentationCamEngine(_TargetEngine):
    """``engine(x, classes=None, regions=None)`` -> one :class:`ClassMaps` per image.

    x: (B, 3, H, W), the normalised model input. Per image (each argument a sequence of B entries or
    None), see :func:`segmentation_rows`: ``classes`` the classes to explain (default: those predicted
    on at least ``min_pixels`` pixels, without ``ignore``); ``regions`` None (predicted), a label map or
    boolean masks. The model returns (B, K, H', W') scores, or torchvision's dict with ``out``."""

    task = "segmentation"

    def __call__(self, x: Tensor, classes: Sequence | None = None, regions: Sequence | None = None,
                 min_pixels: int = 1, ignore: Sequence[int] = ()) -> list[ClassMaps]:
        B = x.shape[0]
        classes, regions = _per_image(classes, B, "class lists"), _per_image(regions, B, "regions")
        _check_lists(classes, self.num_classes, "class")

        def choose(out: Tensor):
            pred = out.detach().argmax(1)
            probs = out.detach().float().softmax(1)
            rows = []
            for i in range(B):
                cls, reg, status, reasons, note = segmentation_rows(pred[i], out.shape[1], classes[i], regions[i],
                                                                    min_pixels, ignore)
                mask = reg.to(out.dtype)
                # pytorch-grad-cam's SemanticSegmentationTarget; an empty region reads nothing
                targets = [(out[i, c] * m).sum() if s == "ok" else out.new_zeros(())
                           for c, m, s in zip(cls, mask, status)]
                n = reg.flatten(1).sum(1).float()
                scores = ((probs[i, cls] * mask).flatten(1).sum(1) / n).cpu() if cls else torch.zeros(0)
                rows.append((cls, targets, scores, status, reasons, reg.cpu(), note))
            return rows

        return self._run(x, choose)


class MultiLabelCamEngine(_TargetEngine):
    """``engine(x, labels=None)`` -> one :class:`ClassMaps` per image: a map per label whose sigmoid
    probability is >= ``threshold`` (or per label given for that image), explaining the label's logit."""

    task = "multilabel"

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str], method: str = "gradcam",
                 reshape_transform: Callable | None = None, num_classes: int | None = None,
                 threshold: float = THRESHOLD):
        super().__init__(model, target_layers, method, reshape_transform, num_classes)
        if not 0 < threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def __call__(self, x: Tensor, labels: Sequence | None = None) -> list[ClassMaps]:
        B = x.shape[0]
        labels = _per_image(labels, B, "label lists")
        _check_lists(labels, self.num_classes, "label")

        def choose(out: Tensor):
            probs = out.detach().float().sigmoid()
            rows = []
            for i in range(B):
                cls, note = multilabel_rows(probs[i], labels[i], self.threshold)
                rows.append((cls, [out[i, c] for c in cls], probs[i, cls].cpu(), ["ok"] * len(cls),
                             [""] * len(cls), None, note))
            return rows

        return self._run(x, choose)


# --- black boxes -------------------------------------------------------------------------------------------

class TargetScores:
    """A task backend as RISE/DE-CAM see a classifier: ``probs(xs)`` -> (n, T), column t the score of
    one image's t-th explained target on each (masked) copy of that image; ``calls`` are the backend's."""

    kind = "target-scores"

    def __init__(self, backend, score: Callable[[Tensor], Tensor], n_targets: int):
        self.backend, self.score, self.num_classes = backend, score, int(n_targets)
        self.device = backend.device

    @property
    def calls(self) -> int:
        return self.backend.calls

    def probs(self, xs: Tensor) -> Tensor:
        return self.score(self.backend.probs(xs))


def region_score(classes: Sequence[int], regions: Tensor) -> Callable[[Tensor], Tensor]:
    """Probabilities (n, K, H, W) -> (n, T): per class its mean softmax probability over its region."""
    cls = list(classes)
    r = regions.float()
    area = r.flatten(1).sum(1)

    def score(p: Tensor) -> Tensor:
        rr = r.to(p.device)
        return torch.einsum("nthw,thw->nt", p[:, cls].float(), rr) / area.to(p.device)

    return score


def _clean_probs(backend, x: Tensor, task: str) -> Tensor:
    """The clean pass: the backend's probabilities, checked to be a ``task`` backend's."""
    if getattr(backend, "task", task) != task:
        raise ConfigError(f"a {task} explanation needs a {task} backend (task={task!r}), got a "
                          f"{backend.task} one")
    with torch.no_grad():
        probs = backend.probs(x.float()).to(x.device)
    return check_scores(probs, task, backend.num_classes, f"{getattr(backend, 'kind', '?')} backend", x.shape[0],
                        ConfigError)


def _blackbox(x: Tensor, rows, method: str, budget: int, seeds, kw: dict) -> list[ClassMaps]:
    """rows: per image (backend adapter or None, classes, scores, status, reasons, regions, note)."""
    if method not in BLACKBOX:
        raise ConfigError(f"unknown black-box method {method!r}; known: {sorted(BLACKBOX)}")
    from .blackbox import _seed_list, check_budget

    check_budget(budget)
    seeds = _seed_list(seeds, x.shape[0])
    out = []
    for i, (scorer, cls, scores, status, reasons, regions, note) in enumerate(rows):
        live = [t for t, s in enumerate(status) if s == "ok"]
        xi = x[i:i + 1].float()
        maps = None
        if live and method == "rise":  # all targets of the image on the same masks
            maps = BLACKBOX[method](scorer, xi, torch.arange(len(live))[None], budget=budget, seeds=[seeds[i]],
                                    **kw)[0]
        elif live:  # DE-CAM searches for one target at a time
            maps = BLACKBOX[method](scorer, xi.expand(len(live), -1, -1, -1), torch.arange(len(live)), budget=budget,
                                    seeds=[seeds[i]] * len(live), **kw)
        if maps is None:
            shape = (x.shape[-2:] if method == "rise" else (kw.get("grid", 7),) * 2)
            full = torch.zeros(len(cls), *shape, device=x.device)
        else:
            full = maps.new_zeros((len(cls), *maps.shape[-2:]))
            full[live] = maps
        out.append(ClassMaps(torch.tensor(cls, dtype=torch.long), full.float(), scores.clone(), scores, status,
                             reasons, regions, tuple(x.shape[-2:]), note))
    return out


def segmentation_blackbox(backend, x: Tensor, method: str = "rise", classes: Sequence | None = None,
                          regions: Sequence | None = None, budget: int = default("budget"), seeds=None,
                          min_pixels: int = 1, ignore: Sequence[int] = (), **kw) -> list[ClassMaps]:
    """RISE / DE-CAM maps of a segmentation backend (``task='segmentation'``, ``probs(x)`` -> (B, K, H, W)):
    per image its classes (as :class:`SegmentationCamEngine` picks them), each explained by its mean
    probability over its region in the clean image. ``targets`` and ``scores`` hold that clean value."""
    kw.setdefault("max_batch", 32)  # a masked copy's output is a whole (K, H, W) map
    B = x.shape[0]
    classes, regions = _per_image(classes, B, "class lists"), _per_image(regions, B, "regions")
    probs = _clean_probs(backend, x, "segmentation")
    rows = []
    for i in range(B):
        cls, reg, status, reasons, note = segmentation_rows(probs[i].argmax(0), backend.num_classes, classes[i],
                                                            regions[i], min_pixels, ignore)
        live = [t for t, s in enumerate(status) if s == "ok"]
        score = region_score([cls[t] for t in live], reg[live])
        clean = torch.full((len(cls),), float("nan"))
        if live:
            clean[live] = score(probs[i:i + 1])[0].float().cpu()
        rows.append((TargetScores(backend, score, len(live)), cls, clean, status, reasons, reg.cpu(), note))
    return _blackbox(x, rows, method, budget, seeds, kw)


def multilabel_blackbox(backend, x: Tensor, method: str = "rise", labels: Sequence | None = None,
                        threshold: float = THRESHOLD, budget: int = default("budget"), seeds=None,
                        **kw) -> list[ClassMaps]:
    """RISE / DE-CAM maps of a multi-label backend (``task='multilabel'``, ``probs(x)`` -> (B, K) sigmoid
    probabilities): per image a map per positive (or given) label, explaining its probability."""
    B = x.shape[0]
    labels = _per_image(labels, B, "label lists")
    probs = _clean_probs(backend, x, "multilabel")
    rows = []
    for i in range(B):
        cls, note = multilabel_rows(probs[i], labels[i], threshold)
        scorer = TargetScores(backend, lambda p, c=cls: p[:, c], len(cls))
        rows.append((scorer, cls, probs[i, cls].float().cpu(), ["ok"] * len(cls), [""] * len(cls), None, note))
    return _blackbox(x, rows, method, budget, seeds, kw)
