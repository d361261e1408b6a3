"""Invalid-pixel activation metrics, per image, on the device that holds the maps.

With H the raw CAM upsampled bilinearly (align_corners=False) to the mask's resolution and M the
invalid mask (True = invalid pixel):

- ``invalid_activation_ratio`` = Σ(H·M) / ΣH — share of heatmap mass on invalid pixels;
- ``invalid_area_ratio``       = ΣM / N      — share of pixels that are invalid (the ratio a flat map gets);
- ``peak_in_invalid``          — the map's maximum is reached on an invalid pixel (ties count);
- ``topk_invalid_share``       — share of invalid pixels among the hottest ones: k = ceil(topk · N) with
  ``topk`` = 0.1 by default, taking every pixel at least as hot as the k-th hottest (ties included,
  so the value does not depend on the order of equal pixels);
- ``relevance_rank_accuracy`` — share of invalid pixels among the hottest |M| pixels (|M| = ΣM, the
  number of invalid pixels): Quantus's RelevanceRankAccuracy with M as its ``s_batch``. Pixels tied
  with the |M|-th value (within the tolerance below) share the slots left after the hotter pixels
  pro rata: (invalid hotter + (|M| − hotter) · invalid tied / tied) / |M|. That is Quantus's value
  whenever the tie does not straddle the |M|-th place, and its mean over all orders of the tied pixels
  otherwise (Quantus takes whatever order ``np.argsort`` leaves them in); the count stays |M|, and a
  flat map scores ΣM / N, like ``invalid_area_ratio``;
- ``auc``                      — ROC-AUC of H as a score for invalid pixels (Quantus's AUC: sklearn on
  the flattened M and H): the Mann–Whitney U of the invalid pixels' ranks over |M|·(N − |M|), ties
  counted half (average ranks) — the probability that a random invalid pixel is hotter than a random
  valid one. Exact ties, as sklearn: a near-tie flipped by rounding moves it by 1/(|M|·(N − |M|)).

Both are NaN without activation and when M is empty or covers the image (no ranking to judge).
Quantus gives NaN for an empty mask; for a full one 1.0 and NaN; for an all-zero map whatever order
argsort leaves the zeros in, and 0.5. The README's "Metrics (per image)" compares all six columns.

Ties are decided with a tolerance of :data:`TIE_TOL` times the map's peak: a pixel that close below
the k-th value (or below the peak, or on either side of the |M|-th value) counts as tied. The same
map computed in batches of another size differs by float32 rounding (about 1e-10 of its peak: the
reductions run in another order); an exact comparison would flip such near-ties and with them the
share (4e-4 between merged shards and one run), a tolerance far above rounding and far below any
meaningful difference of heat does not.

Detections (:func:`box_metrics`), with B the detection's box (pixels whose centre lies inside it):

- ``outside_box_ratio`` = Σ(H·(1−B)) / ΣH — share of heat mass outside the box: how much the
  detection rests on context rather than on the object;
- ``box_invalid_area``  = Σ(M·B) / ΣB — share of the box's pixels that are invalid (NaN for a box
  that covers no pixel centre).

Segmentation classes (:func:`region_metrics`), with R the class's region (the pixels predicted as the
class, or a given region) brought to the mask's resolution by nearest neighbour (as masks are):

- ``outside_region_ratio`` = Σ(H·(1−R)) / ΣH — share of heat mass outside the class's own region;
- ``region_invalid_area``  = Σ(M·R) / ΣR — share of the region's pixels that are invalid (NaN for an
  empty region).

A map with ΣH = 0 has no activation: the ratios are NaN and the row's status is ``no_activation``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cam import upsample
from ..errors import ConfigError
from ..settings import default

TOPK_DEFAULT = default("topk")  # the one definition: camgate.settings
TIE_TOL = 1e-6  # relative to the map's peak: near-ties by float rounding count as ties
METRIC_COLUMNS = ("invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid", "topk_invalid_share",
                  "relevance_rank_accuracy", "auc")


@dataclass
class Metrics:
    invalid_activation_ratio: torch.Tensor  # (B,) float, NaN when no activation
    invalid_area_ratio: torch.Tensor        # (B,)
    peak_in_invalid: torch.Tensor           # (B,) bool
    topk_invalid_share: torch.Tensor        # (B,) float, NaN when no activation
    relevance_rank_accuracy: torch.Tensor   # (B,) float, NaN when no activation or M empty/full
    auc: torch.Tensor                       # (B,) float, NaN when no activation or M empty/full
    active: torch.Tensor                    # (B,) bool: ΣH > 0 and finite

    def rows(self) -> list[dict]:
        """Host-side values, one dict per image (the only device -> host transfer)."""
        cols = {k: getattr(self, k).cpu().tolist() for k in (*METRIC_COLUMNS, "active")}
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _metrics_same_size(cams: torch.Tensor, masks: torch.Tensor, topk: float) -> Metrics:
    """cams (B, h, w) raw, masks (B, H, W) bool -> metrics, all batched."""
    n = masks.shape[-1] * masks.shape[-2]
    heat = upsample(cams.float(), tuple(masks.shape[-2:])).flatten(1).clamp(min=0)
    m = masks.flatten(1).to(heat.dtype)
    total = heat.sum(1)
    active = (total > 0) & torch.isfinite(total)
    nan = torch.full_like(total, math.nan)
    ratio = torch.where(active, (heat * m).sum(1) / total.clamp(min=torch.finfo(heat.dtype).tiny), nan)
    area = m.mean(1)
    peak = heat.max(1).values
    tol = TIE_TOL * peak
    peak_invalid = ((heat * m).max(1).values >= peak - tol) & (m.sum(1) > 0) & active
    ascending, order = heat.sort(1)
    k = max(1, math.ceil(topk * n))
    kth = ascending[:, n - k:n - k + 1]
    hot = (heat >= kth - tol[:, None]).to(heat.dtype)
    topk_share = torch.where(active, (hot * m).sum(1) / hot.sum(1), nan)
    rank_acc, auc = _localisation(heat, ascending, order, masks.flatten(1).bool(), tol, active)
    return Metrics(ratio, area, peak_invalid, topk_share, rank_acc, auc, active)


def _localisation(heat: torch.Tensor, ascending: torch.Tensor, order: torch.Tensor, inv: torch.Tensor,
                  tol: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``relevance_rank_accuracy`` and ``auc`` of heat (B, N) against the invalid pixels ``inv`` (B, N)
    bool, given each row sorted (``ascending`` = heat.gather(1, order)); counts in integers, ratios in
    float64."""
    n = heat.shape[1]
    n_inv = inv.sum(1)
    judged = active & (n_inv > 0) & (n_inv < n)
    nan = torch.full(n_inv.shape, math.nan, dtype=torch.float64, device=heat.device)
    # the |M|-th hottest value; pixels within tol of it are tied, those above it by more are hotter
    v = ascending.gather(1, (n - n_inv).clamp(0, n - 1)[:, None])
    hotter = heat > v + tol[:, None]
    tied = (heat - v).abs() <= tol[:, None]
    n_hot, n_tied = hotter.sum(1), tied.sum(1).clamp(min=1)
    slots = (n_inv - n_hot).double()  # the places left for the tied pixels: 1 .. n_tied
    hits = (hotter & inv).sum(1).double() + slots * (tied & inv).sum(1).double() / n_tied.double()
    rank_acc = torch.where(judged, hits / n_inv.clamp(min=1).double(), nan)
    # Mann-Whitney in sorted order: a run of equal values at 0-based places first..last has the average
    # 1-based rank (first + last + 2) / 2; U = Σ ranks of the invalid pixels - |M|(|M| + 1) / 2
    place = torch.arange(n, dtype=torch.int32, device=heat.device).expand_as(order)  # N < 2^30
    starts = torch.ones_like(inv)
    starts[:, 1:] = ascending[:, 1:] != ascending[:, :-1]
    ends = torch.ones_like(inv)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, place, 0).cummax(1).values
    last = torch.where(ends, place, n).flip(1).cummin(1).values.flip(1)
    twice_rank = torch.where(inv.gather(1, order), first + last + 2, 0).sum(1, dtype=torch.int64)
    twice_u = twice_rank - n_inv * (n_inv + 1)
    auc = torch.where(judged, twice_u.double() / (2 * n_inv * (n - n_inv)).clamp(min=1).double(), nan)
    return rank_acc, auc


def check_topk(topk: float) -> None:
    if not 0 < topk <= 1:
        raise ConfigError(f"topk must be in (0, 1], got {topk}")


def invalid_metrics(cams: torch.Tensor | list[torch.Tensor], masks: list[torch.Tensor],
                    topk: float = TOPK_DEFAULT) -> Metrics:
    """Metrics for a batch whose masks may differ in size: images are grouped by mask size, so a
    fixed camera (one size) is a single batched computation."""
    check_topk(topk)
    b = len(masks)
    if b == 0:
        e = torch.empty(0)
        return Metrics(e, e, e.bool(), e, e, e, e.bool())
    groups: dict[tuple, list[int]] = {}
    for i, mk in enumerate(masks):
        groups.setdefault((tuple(mk.shape), tuple(cams[i].shape)), []).append(i)
    device = masks[0].device
    out = {k: torch.empty(b, device=device) for k in METRIC_COLUMNS if k != "peak_in_invalid"}
    out["peak_in_invalid"] = torch.empty(b, dtype=torch.bool, device=device)
    out["active"] = torch.empty(b, dtype=torch.bool, device=device)
    for idx in groups.values():
        sel = torch.tensor(idx, device=device)
        part = _metrics_same_size(torch.stack([cams[i] for i in idx]), torch.stack([masks[i] for i in idx]), topk)
        for k in out:
            out[k][sel] = getattr(part, k).to(out[k].dtype)
    return Metrics(**out)


def box_metrics(cams: list[torch.Tensor], masks: list[torch.Tensor],
                boxes: list[tuple[float, float, float, float]]) -> list[dict]:
    """``outside_box_ratio`` and ``box_invalid_area`` per map; boxes xyxy in the mask's pixels."""
    out = []
    for cam, mask, box in zip(cams, masks, boxes):
        h, w = mask.shape[-2:]
        heat = upsample(cam[None].float(), (h, w))[0].clamp(min=0)
        ys = torch.arange(h, device=heat.device, dtype=heat.dtype)[:, None] + 0.5
        xs = torch.arange(w, device=heat.device, dtype=heat.dtype)[None, :] + 0.5
        x1, y1, x2, y2 = (float(v) for v in box)
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        total = heat.sum()
        ok = bool(total > 0) and bool(torch.isfinite(total))
        outside = float((heat * ~inside).sum() / total) if ok else math.nan
        n = int(inside.sum())
        area = float((mask.to(heat.device).bool() & inside).sum()) / n if n else math.nan
        out.append({"outside_box_ratio": outside, "box_invalid_area": area})
    return out



def _region_at(region: torch.Tensor, size: tuple[int, int], device) -> torch.Tensor:
    """A (H', W') region -> bool (H, W) at ``size``, nearest neighbour (as masks are resized)."""
    r = torch.as_tensor(region, device=device)
    if r.ndim != 2:
        raise ConfigError(f"a region must be (H, W), got shape {tuple(r.shape)}")
    if tuple(r.shape) != tuple(size):
        r = torch.nn.functional.interpolate(r[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0]
    return r.bool()


def outside_region_ratio(cam: torch.Tensor, region: torch.Tensor, size: tuple[int, int] | None = None) -> float:
    """Σ(H·(1−R)) / ΣH with H the raw map (h, w) upsampled bilinearly to ``size`` (default: the region's)
    and R the region brought to that size; NaN without activation."""
    size = tuple(size or region.shape[-2:])
    heat = upsample(cam[None].float(), size)[0].clamp(min=0)
    inside = _region_at(region, size, heat.device)
    total = heat.sum()
    if not (bool(total > 0) and bool(torch.isfinite(total))):
        return math.nan
    return float((heat * ~inside).sum() / total)


def region_invalid_area(region: torch.Tensor, mask: torch.Tensor) -> float:
    """Σ(M·R) / ΣR: the share of the region's pixels that are invalid, at the mask's resolution; NaN
    for an empty region."""
    inside = _region_at(region, tuple(mask.shape[-2:]), mask.device)
    n = int(inside.sum())
    return float((mask.bool() & inside).sum()) / n if n else math.nan


def region_metrics(cams: list[torch.Tensor], masks: list[torch.Tensor], regions: list[torch.Tensor]) -> list[dict]:
    """``outside_region_ratio`` and ``region_invalid_area`` per map, at each mask's resolution: cams
    (h, w) raw, masks (H, W) invalid pixels, regions (H', W') bool (e.g. ``ClassMaps.regions[t]``)."""
    return [{"outside_region_ratio": outside_region_ratio(cam, region, tuple(mask.shape[-2:])),
             "region_invalid_area": region_invalid_area(region, mask)}
            for cam, mask, region in zip(cams, masks, regions)]
