"""D-RISE (Petsiuk et al., CVPR 2021): black-box saliency for object detectors.

The detector is a callable taking a float batch (n, 3, H, W) in [0, 1] and returning, per image, a
dict ``boxes`` (M, 4, xyxy in input pixels), ``labels`` (M,), ``scores`` (M,) and optionally ``probs``
(M, K) class-score vectors (torchvision's convention). It is shown ``budget`` randomly masked copies
of each image; each masked copy's detections are compared with each target detection t:

    similarity(t, masked) = max over the masked detections j of IoU(b_t, b_j) * cos(p_t, p_j) * s_j

with p the class-score vectors when both the target and the masked detections carry ``probs``, else
one-hot labels (the cosine is then 1 for the same label, 0 otherwise), and s_j the detection's score
(the paper's objectness; torchvision detectors have none). The map of t is
sum_i similarity_i * M_i / budget, at input resolution.

Masks, budget, seeding and batching are RISE's (:mod:`camgate.cam.blackbox`): the same s x s grids
(p = ``p``), bilinearly upsampled and randomly shifted, drawn per image from its own
``torch.Generator(seed)`` (a map does not depend on the other images of the batch), exactly ``budget``
masked images per image (plus one clean pass per image whose targets are not given), masked images
of several images sent to the detector together in chunks of ``max_batch``. Fill ``zero`` (black in
[0, 1] images), as the paper masks.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch
import torchvision
from torch import Tensor

from ..errors import ConfigError
from ..settings import default
from .blackbox import _blocks, _check, fill_image, rise_draws, rise_masks
from .detection import DetectionMaps

Detector = Callable[[Tensor], Sequence[Mapping[str, Tensor]]]


def similarity(target: Mapping[str, Tensor], dets: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """(T, n): for each target detection, the best match in each of n detection sets (0 when none)."""
    tb = torch.as_tensor(target["boxes"]).float().reshape(-1, 4)
    T, n = tb.shape[0], len(dets)
    out = torch.zeros(T, n)
    sizes = [len(d["boxes"]) for d in dets]
    if not T or not sum(sizes):
        return out
    boxes = torch.cat([torch.as_tensor(d["boxes"]).float().reshape(-1, 4).cpu() for d in dets])
    scores = torch.cat([torch.as_tensor(d["scores"]).float().reshape(-1).cpu() for d in dets])
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))
    iou = torch.nan_to_num(torchvision.ops.box_iou(tb.cpu(), boxes), nan=0.0)  # degenerate boxes: no overlap
    if "probs" in target and all("probs" in d for d in dets):
        tp = torch.as_tensor(target["probs"]).float().cpu()
        dp = torch.cat([torch.as_tensor(d["probs"]).float().cpu() for d in dets])
        agree = torch.nn.functional.normalize(tp, dim=1) @ torch.nn.functional.normalize(dp, dim=1).T
    else:
        labels = torch.cat([torch.as_tensor(d["labels"]).reshape(-1).cpu() for d in dets])
        agree = (torch.as_tensor(target["labels"]).reshape(-1, 1).cpu() == labels[None]).float()
    sim = (iou * agree * scores[None]).clamp(min=0)
    return out.scatter_reduce_(1, owner[None].expand(T, -1), sim, "amax", include_self=True)


def _run(detector: Detector, xs: Tensor, clock: dict) -> list:
    t = time.perf_counter()
    with torch.no_grad():
        outs = list(detector(xs))
    clock["model"] += time.perf_counter() - t
    if len(outs) != xs.shape[0]:
        raise ConfigError(f"the detector returned {len(outs)} results for {xs.shape[0]} images")
    return outs


def drise(detector: Detector, x: Tensor, targets: Sequence[Mapping | None] | None = None,
          budget: int = default("budget"), seeds=None, grid: int = 16, p: float = 0.5, fill: str = "zero",
          sigma: float | None = None, max_batch: int = 64, stats: dict | None = None) -> list[Tensor]:
    """D-RISE maps: per image a (T_i, H, W) float32 tensor on x's device, one map per target detection.

    targets: per image a dict ``boxes`` (T, 4), ``labels`` (T,) and optionally ``probs`` (T, K), or
    None for the detector's own detections on the clean image (one extra pass per such image)."""
    _check(budget, grid)
    if not 0 < p < 1:
        raise ConfigError(f"p must be in (0, 1), got {p}")
    t0, clock = time.perf_counter(), {"model": 0.0}
    x = x.float()
    B, (H, W) = x.shape[0], tuple(x.shape[-2:])
    if targets is None:
        targets = [None] * B
    targets = list(targets)
    if len(targets) != B:
        raise ConfigError(f"{len(targets)} target sets for {B} images")
    need = [i for i, t in enumerate(targets) if t is None]
    if need:
        for i, out in zip(need, _run(detector, x[need], clock)):
            targets[i] = out
    base = fill_image(x, fill, sigma)
    dev = x.device
    draws = rise_draws(seeds, B, budget, grid, p, (H, W), dev)
    sal = [torch.zeros(len(torch.as_tensor(t["boxes"]).reshape(-1, 4)), H, W, device=dev) for t in targets]
    diff = x - base
    for i0, i1, j0, j1 in _blocks(B, budget, max_batch):
        ni, nj = i1 - i0, j1 - j0
        m = rise_masks(draws, i0, i1, j0, j1, (H, W)).view(ni, nj, H, W)
        xs = torch.addcmul(base[i0:i1, None], diff[i0:i1, None], m[:, :, None]).view(ni * nj, -1, H, W)
        outs = _run(detector, xs, clock)
        for k, i in enumerate(range(i0, i1)):  # one image at a time: its sums do not depend on the others
            if len(sal[i]):
                w = similarity(targets[i], outs[k * nj:(k + 1) * nj]).to(dev)  # (T_i, nj)
                sal[i] += (w @ m[k].reshape(nj, H * W)).view(-1, H, W)
    if stats is not None:
        total = time.perf_counter() - t0
        stats.update(total_s=total, model_s=clock["model"], bookkeeping_s=total - clock["model"], images=B,
                     evaluations=B * budget, clean_passes=len(need))
    return [(s / budget).float() for s in sal]


def drise_detections(detector: Detector, x: Tensor, budget: int = default("budget"), seeds=None,
                     select: Callable[[int, Mapping[str, Tensor]], Sequence[int]] | None = None,
                     **kw) -> list[DetectionMaps]:
    """The detections of the clean images with their D-RISE maps, as :class:`DetectionMaps` (maps at
    input resolution; ``targets`` holds each detection's score). ``select(i, output)``: which of image
    i's detections to explain (indices into its output, kept in ``extra['index']``), as for
    :class:`camgate.cam.detection.DetectionCamEngine`; default: all."""
    with torch.no_grad():
        dets = list(detector(x.float()))
    index = [None if select is None else torch.as_tensor(list(select(i, d)), dtype=torch.long)
             for i, d in enumerate(dets)]
    dets = [d if idx is None else {k: torch.as_tensor(v)[idx] for k, v in d.items()} for d, idx in zip(dets, index)]
    maps = drise(detector, x, dets, budget=budget, seeds=seeds, **kw)
    out = []
    for d, m, idx in zip(dets, maps, index):
        scores = torch.as_tensor(d["scores"]).float().reshape(-1).cpu()
        extra = {"probs": torch.as_tensor(d["probs"]).cpu()} if "probs" in d else {}
        if idx is not None:
            extra["index"] = idx
        out.append(DetectionMaps(torch.as_tensor(d["boxes"]).float().reshape(-1, 4).cpu(),
                                 torch.as_tensor(d["labels"]).reshape(-1).cpu(), scores, m, scores.clone(),
                                 tuple(x.shape[-2:]), extra))
    return out
