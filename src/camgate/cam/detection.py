"""Per-detection gradient CAMs for object detectors that follow torchvision's output convention.

A detector takes a list of (3, H, W) images in [0, 1] (or a (B, 3, H, W) batch) and returns, per
image, a dict ``boxes`` (N, 4, xyxy in input pixels), ``labels`` (N,) and ``scores`` (N,). The map of
a detection explains its *box score*, defined on the detector's outputs as pytorch-grad-cam's
``FasterRCNNBoxScoreTarget`` defines it: the output box with the highest IoU with the explained box
is taken; when that IoU exceeds ``iou_threshold`` and its label is the explained label, the target
is ``IoU + score``, else 0 (no gradient: an all-zero map).

:class:`DetectionCamEngine` runs ONE forward pass per batch, then gets the gradients of every
detection's target from that one graph:

  * the images of a batch do not interact in a detector in eval mode (per-image proposals, NMS and
    top-k; batch norm on running statistics), so the k-th detections of all images share one
    backward pass: the gradient of their sum, sliced per image, is each one's own gradient. A batch
    costs max_i N_i backward passes (over the part of the network after the target layers) instead
    of sum_i N_i full forward + backward passes;
  * parameters are frozen for the call (:func:`camgate.cam.engine.frozen_parameters`) and each
    target activation is cut into a fresh autograd leaf by a forward hook, as in the classification
    engine: nothing before the target layers records a graph and no parameter gradient is computed.

Target layers may return a tensor (``backbone.body.layer4``, the default) or a dict of tensors (an
FPN, ``backbone``): a dict is turned into one (B, C, h, w) tensor by ``reshape_transform`` (both
activations and gradients), e.g. :func:`fpn_reshape`.

Gradients come from a loop of ``autograd.grad(..., retain_graph=True)`` over the detection ranks.
Batched vector-Jacobian products (``is_grads_batched=True``, vmap) work on torchvision's graphs but
were not faster on CPU (benchmarks/RESULTS.md) and cannot use the sparse RoIAlign backward below.
For two-stage detectors torchvision's RoIAlign backward runs only over the RoIs that receive a
gradient (a detection reads one of ~1000; the stock CPU kernel visits all and dominated the cost).

The box-score target takes the IoU of the explained box with the output boxes. A detection explained
as itself matches its own output box exactly (IoU = 1, a kink of IoU: autograd splits the gradient
of the tied min/max), as in pytorch-grad-cam's workflow (detect an image, explain its boxes); a box
that differs in the last bits (the same image detected in another batch) lies off the kink and gets
a visibly different map. A box without a match (its best IoU <= threshold, another label, a
zero-area box whose IoU is NaN) gets target 0 and an all-zero map.

Maps cover the input image: torchvision's transform resizes each image (proportionally, so the map
stretches back onto it) and pads the batch at the bottom and right to a multiple of 32; the padded
band is cut off the map (bilinear resampling of the covered part, at the same cell density), so a
map's pixel grid lines up with the input image and with its mask.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torchvision
import torchvision.ops.poolers
from torch import Tensor, nn

from ..model.layers import fpn_reshape  # noqa: F401 - re-exported: camgate.cam.fpn_reshape
from .engine import MethodError, _aggregate, canonical, forward_with_copies, frozen_parameters, rank_grads
from .maps import normalized
from .methods import NATIVE

IOU_THRESHOLD = 0.5  # pytorch-grad-cam's FasterRCNNBoxScoreTarget default


@dataclass
class DetectionMaps:
    """One image's explained detections and their maps."""
    boxes: Tensor    # (N, 4) xyxy, input image pixels
    labels: Tensor   # (N,) int64
    scores: Tensor   # (N,) the detector's score of each explained detection (0 when not re-found)
    maps: Tensor     # (N, h, w) raw ReLU'd maps over the input image (feature resolution), float32,
    #                  on the model's device (the other fields are on the CPU)
    targets: Tensor  # (N,) the explained value: IoU + score of the matched output, 0 when none matched
    image_size: tuple[int, int]  # (H, W) of the input image
    extra: dict = field(default_factory=dict)  # further per-detection outputs of the detector

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def normalized(self, size: tuple[int, int] | None = None) -> Tensor:
        """(N, H, W) display maps: min-max, bilinear to the input size (or ``size``), min-max."""
        if not len(self):
            return self.maps.new_zeros((0, *(size or self.image_size)))
        return normalized(self.maps, tuple(size or self.image_size))


def box_score(output: Mapping[str, Tensor], box: Tensor, label: int | Tensor,
              iou_threshold: float = IOU_THRESHOLD) -> Tensor:
    """pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` for one box: IoU + score of the output box
    that overlaps ``box`` most, when that IoU exceeds the threshold and the labels agree; else 0.
    Same operations in the same order, so gradients equal the reference's."""
    boxes = output["boxes"]
    zero = torch.zeros(1, device=boxes.device, dtype=boxes.dtype)
    if len(boxes) == 0:
        return zero
    ious = torchvision.ops.box_iou(torch.as_tensor(box, device=boxes.device, dtype=boxes.dtype)[None, :], boxes)
    index = ious.argmax()
    if ious[0, index] > iou_threshold and output["labels"][index] == label:
        return zero + (ious[0, index] + output["scores"][index])
    return zero


def default_layers(model: nn.Module) -> list[nn.Module]:
    """The detector's default target layer (:func:`camgate.model.layers.default_detection_layers`)."""
    from ..errors import ModelCardError
    from ..model.layers import default_detection_layers, resolve_layers

    try:
        return resolve_layers(model, default_detection_layers(model))
    except ModelCardError as e:
        raise MethodError(str(e)) from None


def _as_images(x) -> list[Tensor]:
    if torch.is_tensor(x):
        if x.ndim != 4:
            raise MethodError(f"expected a (B, 3, H, W) batch or a list of (3, H, W) images, got {tuple(x.shape)}")
        return list(x.unbind(0))
    return list(x)


def _to_leaf(out, needs_grad: bool, clone: bool):
    """A hooked output -> (what the network goes on with, dict keys or None for a tensor, the leaves)."""
    def leaf(t: Tensor) -> Tensor:
        act = t.detach()
        if needs_grad:  # a layer downstream of another target layer is already on the graph
            act = t if t.requires_grad else act.requires_grad_(True)
        return act

    if torch.is_tensor(out):
        act = leaf(out)
        return (act.clone() if clone else act), None, [act]
    if isinstance(out, Mapping) and all(torch.is_tensor(v) for v in out.values()):
        leaves = [leaf(v) for v in out.values()]
        handed = type(out)((k, a.clone() if clone else a) for k, a in zip(out.keys(), leaves))
        return handed, list(out.keys()), leaves
    raise MethodError(f"target layer returns {type(out).__name__}, not a tensor or a dict of tensors")


class _SparseRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign whose backward skips the RoIs that receive no gradient.

    A detection's score reads one RoI (its proposal) of the ~1000 a two-stage detector pools per image;
    the stock CPU backward loops over all of them, zeros included, and dominated the cost of a map.
    The RoIs with gradient go through the stock backward kernel in the same order; the skipped ones
    would have added exact zeros, so the gradient is the stock one to the bit."""

    @staticmethod
    def forward(ctx, inp, rois, spatial_scale, oh, ow, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, oh, ow, *inp.shape, sampling_ratio, aligned)
        return torch.ops.torchvision.roi_align(inp, rois, spatial_scale, oh, ow, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        rows = grad.flatten(1).ne(0).any(1).nonzero()[:, 0]
        gi = torch.ops.torchvision._roi_align_backward(grad[rows].contiguous(), rois[rows], *ctx.args)
        return gi, None, None, None, None, None, None


def _roi_align(inp, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    if not (torch.is_grad_enabled() and inp.requires_grad and torch.is_tensor(boxes)) or inp.is_quantized:
        return _stock_roi_align(inp, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    return _SparseRoIAlign.apply(inp, boxes, float(spatial_scale), int(oh), int(ow), int(sampling_ratio),
                                 bool(aligned))


_stock_roi_align = torchvision.ops.poolers.roi_align


@contextmanager
def _sparse_roi_backward() -> Iterator[None]:
    """torchvision's multi-scale RoI pooler (two-stage detectors) uses :class:`_SparseRoIAlign` for the
    block. Its values and gradients equal the stock ones, so other callers meanwhile are unaffected."""
    poolers = torchvision.ops.poolers
    previous = poolers.roi_align
    poolers.roi_align = _roi_align
    try:
        yield
    finally:
        poolers.roi_align = previous


def _crop(cam: Tensor, frac: tuple[float, float]) -> Tensor:
    """(N, h, w) over a padded canvas -> the part covering the image (its top-left ``frac`` of the
    canvas), resampled bilinearly at the same cell density. No-op without padding."""
    fy, fx = frac
    if fy >= 1 and fx >= 1:
        return cam
    h, w = cam.shape[-2:]
    oh, ow = max(1, round(h * fy)), max(1, round(w * fx))
    ys = ((torch.arange(oh, device=cam.device) + 0.5) / oh * fy) * 2 - 1
    xs = ((torch.arange(ow, device=cam.device) + 0.5) / ow * fx) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).to(cam.dtype)  # (oh, ow, 2) as (x, y)
    return F.grid_sample(cam[:, None], grid.expand(cam.shape[0], oh, ow, 2), mode="bilinear",
                         align_corners=False)[:, 0]


class DetectionCamEngine:
    """``engine(x, detections=None)`` -> one :class:`DetectionMaps` per image.

    x: a (B, 3, H, W) batch or a list of (3, H, W) images, in the detector's own input convention
    (torchvision: [0, 1], normalised and resized inside the model). ``detections``: per image None
    (explain every detection the detector returns) or a dict with ``boxes`` and ``labels`` to
    explain (ground truth, another run's detections), matched in the outputs by IoU and label.

    method: a native gradient method (``gradcam``, ``gradcam++``, ``hirescam``, ...) or ``eigencam``
    (no gradients: every detection of an image gets the same map). ``batch_images=False`` gives
    every detection its own backward pass (for a detector whose images interact in a batch).
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module | str] | None = None,
                 method: str = "gradcam", reshape_transform: Callable | None = None,
                 iou_threshold: float = IOU_THRESHOLD, batch_images: bool = True):
        self.model = model
        if target_layers is None:
            layers = default_layers(model)
        else:
            from ..model.layers import resolve_layers

            layers = resolve_layers(model, target_layers)
        self.layers = layers
        self.method = canonical(method)
        if self.method not in NATIVE:
            raise MethodError(f"detection maps support the native methods {sorted(NATIVE)}, not {self.method!r}")
        self.fn, self.needs_grad = NATIVE[self.method]
        self.reshape = reshape_transform
        self.iou_threshold = iou_threshold
        self.batch_images = batch_images
        self._clone = False

    def close(self) -> None:
        """Nothing to release: hooks live for one call only."""

    # -- the forward pass -------------------------------------------------------------------------
    def _forward(self, images: list[Tensor]):
        captured: list[tuple[list | None, list[Tensor]]] = []  # per layer: (dict keys or None, leaves)
        versions: list[list[int]] = []
        canvas: dict = {}

        def hook(module, _inputs, out):
            handed, keys, leaves = _to_leaf(out, self.needs_grad, self._clone)
            captured.append((keys, leaves))
            versions.append([a._version for a in leaves])
            return handed

        def transform_hook(_module, _inputs, out):  # torchvision: (ImageList, targets)
            il = out[0] if isinstance(out, tuple) else out
            if hasattr(il, "image_sizes") and hasattr(il, "tensors"):
                canvas["sizes"], canvas["padded"] = list(il.image_sizes), tuple(il.tensors.shape[-2:])

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        transform = getattr(self.model, "transform", None)
        if isinstance(transform, nn.Module):
            handles.append(transform.register_forward_hook(transform_hook))
        try:
            with torch.set_grad_enabled(self.needs_grad), _sparse_roi_backward():
                outputs = self.model(images)
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(self.layers):
            raise MethodError(f"expected each target layer to run once per forward, got {len(captured)} "
                              f"activations for {len(self.layers)} layers")
        if any(a._version != v for (_, leaves), vs in zip(captured, versions) for a, v in zip(leaves, vs)):
            return None
        return outputs, captured, canvas

    def __call__(self, x, detections: Sequence[Mapping | None] | None = None,
                 select: Callable[[int, Mapping[str, Tensor]], Sequence[int]] | None = None) -> list[DetectionMaps]:
        """``select(i, output)``: which of image i's own detections to explain (indices into its
        output, detached), e.g. those above a score threshold or matched to ground truth; the
        indices are in each result's ``extra['index']``. Default: all (or ``detections``)."""
        images = _as_images(x)
        if detections is not None and len(detections) != len(images):
            raise MethodError(f"{len(detections)} detection sets for {len(images)} images")
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # a torchvision detector returns detections only in eval mode
        try:
            with frozen_parameters(self.model):
                return self._maps(images, detections, select, *forward_with_copies(self, images))
        finally:
            for m, training in modes.items():
                m.train(training)

    # -- targets, gradients, maps -----------------------------------------------------------------
    def _maps(self, images, detections, select, outputs, captured, canvas) -> list[DetectionMaps]:
        B = len(images)
        explained, targets, chosen = [], [], []
        for i, out in enumerate(outputs):
            want = detections[i] if detections is not None else None
            index = None
            if want is None and select is not None:
                index = torch.as_tensor(list(select(i, {k: v.detach() for k, v in out.items()})), dtype=torch.long,
                                        device=out["boxes"].device).reshape(-1)
                boxes, labels = out["boxes"].detach()[index], out["labels"].detach()[index]
            elif want is None:
                boxes, labels = out["boxes"].detach(), out["labels"].detach()
            else:
                boxes = torch.as_tensor(want["boxes"], dtype=out["boxes"].dtype, device=out["boxes"].device)
                boxes, labels = boxes.reshape(-1, 4), torch.as_tensor(want["labels"]).reshape(-1)
            ts = [box_score(out, b, lab, self.iou_threshold) for b, lab in zip(boxes, labels)]
            explained.append((boxes, labels))
            targets.append(ts)
            chosen.append({} if index is None else {"index": index.cpu()})
        leaves = [a for _, group in captured for a in group]
        grads = rank_grads(targets, leaves, per_image=not self.batch_images) if self.needs_grad else None
        results = []
        with torch.no_grad(), torch.autocast(leaves[0].device.type, enabled=False):
            for i in range(B):
                boxes, labels = explained[i]
                n = len(boxes)
                vals = torch.cat(targets[i]).detach().float().cpu() if n else torch.zeros(0)
                per_layer, start = [], 0
                for keys, group in captured:
                    g = None if grads is None else [gk[start:start + len(group)] for gk in grads[i]]
                    per_layer.append(self._layer_maps(i, keys, group, g, n))
                    start += len(group)
                cams = _aggregate(per_layer) if n else per_layer[0]
                if "sizes" in canvas:
                    (h, w), (ph, pw) = canvas["sizes"][i], canvas["padded"]
                    cams = _crop(cams, (h / ph, w / pw))
                scores = self._matched_scores(outputs[i], boxes, labels, vals)
                results.append(DetectionMaps(boxes.detach().cpu(), labels.cpu(), scores, cams.float(),
                                             vals, tuple(images[i].shape[-2:]), chosen[i]))
        return results

    def _as_map_input(self, keys, parts: list[Tensor]) -> Tensor:
        """One layer's captured tensor(s) for one image -> (1, C, h, w) through the reshape transform."""
        if keys is not None:
            if self.reshape is None:
                raise MethodError("the target layer returns a dict of feature maps: give a reshape_transform "
                                  "(e.g. camgate.cam.detection.fpn_reshape())")
            out = self.reshape(dict(zip(keys, parts)))
        else:
            out = parts[0] if self.reshape is None else self.reshape(parts[0])
        if out.ndim != 4:
            raise MethodError(f"target activation has shape {tuple(out.shape)}; a token layer or a dict needs "
                              f"a reshape transform giving (B, C, h, w)")
        return out

    def _layer_maps(self, i: int, keys, group: list[Tensor], grads_i, n: int) -> Tensor:
        """(n, h, w): the maps of image i's n detections from one target layer."""
        a = self._as_map_input(keys, [t[i:i + 1].detach().float() for t in group])
        if not n:
            return a.new_zeros((0, *a.shape[-2:]))
        if not self.needs_grad:
            return self.fn(a, None).clamp(min=0).expand(n, -1, -1)
        g = torch.cat([self._as_map_input(keys, [torch.zeros_like(t[i:i + 1], dtype=torch.float32) if gj is None
                                                 else gj.float() for t, gj in zip(group, gk)])
                       for gk in grads_i])
        return self.fn(a.expand_as(g), g).clamp(min=0)

    @staticmethod
    def _matched_scores(out, boxes, labels, vals) -> Tensor:
        """The score of the output each explained box matched (own detections: their own score)."""
        if not len(boxes):
            return torch.zeros(0)
        if len(out["boxes"]) == 0:
            return torch.zeros(len(boxes))
        ious = torchvision.ops.box_iou(boxes.to(out["boxes"].dtype), out["boxes"].detach())
        s = out["scores"].detach()[ious.argmax(1)].float().cpu()
        return torch.where(vals > 0, s, torch.zeros_like(s))
