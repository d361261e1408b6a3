"""ROAD faithfulness scoring (Rong et al., ICML 2022), batched and on the images' device.

ROAD — RemOve And Debias — asks whether the pixels a map calls relevant are the ones the model needs.
For each image and each percentile p, the p % pixels the map ranks most relevant (MoRF) or least
relevant (LeRF) are removed and filled by *noisy linear imputation*, and the model scores the result:

- imputation: every removed pixel x_i is the weighted mean of its 8 neighbours,
  ``s_i x_i - Σ_{j removed} w_ij x_j = Σ_{j known} w_ij v_j`` with ``w = 1/6`` (edge), ``1/12``
  (diagonal) and ``s_i = Σ_{j in the image} w_ij`` (1 inside, renormalised at the border); one sparse
  linear system per (image, mask), then Gaussian noise of std ``noise`` (0.01) on the imputed pixels,
  in [0, 1] pixel space;
- curves: ``morf[p]``, ``lerf[p]`` = the model's probability of the target class after removing p %;
- score: ``road = mean_p (lerf[p] - morf[p]) / 2`` — higher is more faithful (removing the relevant
  pixels hurts, removing the irrelevant ones does not). ``road_random`` is the same for a seeded
  uniform-noise map, the floor a map must clear.

Percentile p means "p % of the pixels removed", exactly ``round(p/100 · H·W)`` of them (half up).
The map is upsampled bilinearly (align_corners=False) to the image size, min-max scaled and given a
seeded Gaussian perturbation of 1e-4 before ranking, so ties (flat maps, plateaus) are broken at
random and the count is exact — as the reference implementation (tleemann/road_evaluation) does.

Differences from pytorch-grad-cam's ``ROADCombined`` (``pytorch_grad_cam.metrics.road``):

- it solves each system with ``scipy.sparse.linalg.spsolve`` on the CPU, one image and percentile at a
  time, and re-runs the clean forward for every percentile; here one clean forward per image, and the
  systems of many masks are solved at once by preconditioned conjugate gradient (below) on the device;
- its percentile p *keeps* p % (``cam < np.percentile(cam, p)``), so its curve at p is ours at 100 - p;
  over the symmetric default percentiles the ROAD score is the same quantity;
- with the strict ``<`` it removes every pixel tied at the threshold: an all-zero map removes 100 %,
  a map with plateaus removes more than asked; here ties are broken, the count is exact, and an
  all-zero or non-finite map gives NaN with a reason;
- it adds the 0.01 noise to the *normalised* tensor (about 0.01 · 0.23 in pixel units); here, as in
  the reference, 0.01 in [0, 1] pixel space. The imputation itself is affine-equivariant (weights
  sum to 1), so without noise the two agree up to the normalisation.

Solver: the system matrix ``A = diag(s) - W_RR`` (removed × removed) is symmetric and, when at least
one pixel is known, positive definite, so CG applies. ``A`` is never formed: the 3×3 stencil is
applied as a convolution over the whole image with the unknowns zero at known pixels; all masks and
channels are independent systems in one batch (own step sizes). Plain Jacobi-preconditioned CG needs
O(H+W) iterations (about 160 at 64×64, 500 at 224×224), so the preconditioner is a geometric
multigrid V-cycle (2×2 aggregation, Galerkin coarse stencils, over-corrected; see :class:`_Multigrid`),
which brings that to about 12 and 18. A system has converged when the largest entry of its residual (pixel
units) is ≤ ``tol`` (1e-6; in float32 that leaves a largest error of about 4e-5 against the exact
solution at 64×64, far below the 0.01 noise); converged systems stop updating one by one; if some
are still above ``tol`` after ``max_iter`` iterations (default 100), :class:`ImputationWarning` is
issued and the current iterate is used. 100 % removal (no known pixel) makes ``A`` singular: percentiles must lie in
(0, 100) and every percentile must remove at least one pixel and keep at least one, otherwise
:class:`~camgate.errors.ConfigError` (it names the image size and the percentiles).

Memory: ``road`` builds, imputes and scores ``chunk`` masks at a time (default 64, image-major), so
the peak does not grow with B: the solver (CG vectors, reused stencil buffers, the coarse levels)
peaks at about 16 float tensors of ``chunk × 3 × H × W`` — measured +570 MB for chunk 64 at
224×224 on CPU; pass a smaller ``chunk`` to trade speed for memory.

Seeding: each image draws from its own ``torch.Generator`` on the CPU (moved to the device
afterwards, so CPU and GPU see the same numbers), seeded from ``seed + i`` or from a per-image seed
tensor; results do not depend on which other images share the batch.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..cam import upsample
from ..errors import ConfigError

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
TIE_NOISE = 1e-4  # relative to the min-max scaled map, as in the reference
_STREAM_TIES, _STREAM_RANDOM_MAP, _STREAM_RANDOM_TIES, _STREAM_IMPUTE = range(4)


class ImputationWarning(RuntimeWarning):
    """Conjugate gradient reached its iteration cap before every system met the tolerance."""


def neighbours(x: torch.Tensor, out: torch.Tensor | None = None, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j w_j x(i + d_j) over the 8 neighbours inside the image (zero padding), (..., H, W).
    ``out``/``tmp``: optional buffers shaped like x (CPU path), reused across CG iterations.

    The stencil is (1/12)·([1,2,1] ⊗ [1,2,1] - 4δ). On CUDA one ``F.conv2d``; elsewhere the separable
    form as shifted adds, because a one-channel ``F.conv2d`` is about 5× slower than that on CPU."""
    if x.is_cuda:
        e, d = 1 / 6, 1 / 12
        k = torch.tensor([[d, e, d], [e, 0.0, e], [d, e, d]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
        return F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), k, padding=1).view(x.shape)
    a = torch.mul(x, 2, out=tmp)  # [1, 2, 1] down the columns, in place on shifted views (no padded copy)
    a[..., 1:, :] += x[..., :-1, :]
    a[..., :-1, :] += x[..., 1:, :]
    o = torch.mul(a, 2, out=out)  # then along the rows
    o[..., 1:] += a[..., :-1]
    o[..., :-1] += a[..., 1:]
    return o.sub_(x, alpha=4).mul_(1 / 12)


def _seed_list(seed: int | torch.Tensor, n: int) -> list[int]:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != n:
            raise ConfigError(f"seed tensor has {seed.numel()} values for {n} images")
        return [int(s) for s in seed.flatten().tolist()]
    return [int(seed) + i for i in range(n)]


def _derive(seed: int, stream: int, k: int = 0) -> int:
    """A distinct generator seed per (image seed, purpose, index): streams never share numbers."""
    return (seed * 1_000_003 + stream * 65_537 + k) % (2 ** 63)


def _randn(seeds: Sequence[int], shape: tuple, device, dtype, uniform: bool = False) -> torch.Tensor:
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        out.append(torch.rand(shape, generator=g) if uniform else torch.randn(shape, generator=g))
    return torch.stack(out).to(device=device, dtype=dtype)


def _count(p: float, n: int) -> int:
    return math.floor(p / 100 * n + 0.5)


def check_percentiles(percentiles: Sequence[float], size: tuple[int, int]) -> list[int]:
    """Pixels removed per percentile; ConfigError if a percentile is outside (0, 100) or the image is
    too small for one of them to remove at least one pixel and keep at least one."""
    ps = list(percentiles)
    if not ps or any(not (0 < p < 100) for p in ps):
        raise ConfigError(f"ROAD percentiles must lie in (0, 100) (100 % removal leaves nothing to "
                          f"impute from), got {ps}")
    n = size[0] * size[1]
    counts = [_count(p, n) for p in ps]
    if any(k < 1 or k >= n for k in counts):
        raise ConfigError(f"image {size[0]}x{size[1]} is too small for ROAD percentiles {ps}: they "
                          f"remove {counts} of {n} pixels; each must remove at least 1 and keep at least 1")
    return counts


def removal_order(maps: torch.Tensor, size: tuple[int, int], seed: int | torch.Tensor) -> torch.Tensor:
    """Per-pixel rank (B, H·W), 0 = most relevant, of raw maps (B, h, w) upsampled to ``size``.

    Ties are broken by seeded Gaussian noise of 1e-4 on the min-max scaled map (a flat map becomes a
    random order). Non-finite values rank as the map's minimum."""
    b = maps.shape[0]
    up = upsample(maps.float(), tuple(size)).flatten(1)
    finite = torch.isfinite(up)
    lo = torch.where(finite, up, torch.full_like(up, math.inf)).min(1, keepdim=True).values
    up = torch.where(finite, up, torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo)))
    up = up - lo
    span = up.max(1, keepdim=True).values
    up = up / torch.where(span > 0, span, torch.ones_like(span))
    ties = _randn([_derive(s, _STREAM_TIES) for s in _seed_list(seed, b)], (up.shape[1],), up.device, up.dtype)
    order = torch.argsort(up + TIE_NOISE * ties, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def removal_masks(order: torch.Tensor, size: tuple[int, int], percentiles: Sequence[float] = PERCENTILES,
                  most_relevant_first: bool = True) -> torch.Tensor:
    """(B, P, H, W) bool, True = removed: the round(p % · H·W) most (MoRF) or least (LeRF) relevant."""
    n = size[0] * size[1]
    k = torch.tensor([_count(p, n) for p in percentiles], device=order.device).view(1, -1, 1)
    r = order[:, None, :]
    removed = r < k if most_relevant_first else r >= n - k
    return removed.view(order.shape[0], len(percentiles), *size)


_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _apply_var(coef: list, x: torch.Tensor) -> torch.Tensor:
    """A variable 3×3 stencil (9 coefficient fields (N, 1, h, w), zero padding) applied to x (N, C, h, w)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = coef[4] * x
    for k, (dy, dx) in enumerate(_OFFSETS):
        if k != 4:
            out.addcmul_(coef[k], xp[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
    return out


def _restrict(x: torch.Tensor) -> torch.Tensor:  # sum over 2×2 blocks (odd sizes padded with zeros)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2))
    y = x[..., 0::2, :] + x[..., 1::2, :]  # two strided adds beat a 6-d sum and avg_pool2d on CPU
    return y[..., 0::2] + y[..., 1::2]


def _prolong(x: torch.Tensor, size) -> torch.Tensor:
    """Piecewise constant (the transpose of ``_restrict``); callers mask it to the unknowns."""
    return F.interpolate(x, scale_factor=2, mode="nearest")[..., :size[0], :size[1]]


class _Multigrid:
    """Symmetric V-cycle for the imputation matrix, used as the CG preconditioner.

    Coarse levels aggregate 2×2 cells (piecewise-constant prolongation P restricted to unknowns) with
    the Galerkin operator ``Pᵀ A P``, again a 3×3 stencil, whose 9 coefficient fields are read off by
    applying the finer operator to 9 probe patterns (cells with equal (row mod 3, col mod 3)). One
    damped-Jacobi sweep before and after the coarse correction keeps the cycle symmetric, so CG stays
    valid; only the coarse operators are built, once per solve, on one channel. Piecewise-constant
    aggregates under-correct smooth errors, so the coarse correction is scaled by ``OVER`` (any value
    in (0, 2) keeps the cycle a symmetric positive definite preconditioner): 1.5 halves the CG
    iterations at 224×224 (about 34 to 18) and cuts them from 19 to 12 at 64×64."""

    OMEGA, COARSEST, OVER = 0.8, 4, 1.5

    def __init__(self, apply0, diag0: torch.Tensor, unknown0: torch.Tensor):
        self.ops, self.diags, self.unknown, self.sizes = [apply0], [diag0], [unknown0], [diag0.shape[-2:]]
        while min(self.sizes[-1]) > self.COARSEST:
            fine_apply, fine_unknown, size = self.ops[-1], self.unknown[-1], self.sizes[-1]
            hc, wc = (size[0] + 1) // 2, (size[1] + 1) // 2
            iy = torch.arange(hc, device=diag0.device).view(-1, 1)
            ix = torch.arange(wc, device=diag0.device).view(1, -1)
            coef = [torch.zeros(diag0.shape[0], 1, hc, wc, dtype=diag0.dtype, device=diag0.device) for _ in _OFFSETS]
            for a in range(3):
                for b in range(3):
                    probe = ((iy % 3 == a) & (ix % 3 == b)).to(diag0.dtype).expand(diag0.shape[0], 1, hc, wc)
                    y = _restrict(fine_apply(fine_unknown * _prolong(probe, size)))
                    dy, dx = (a - iy + 1) % 3 - 1, (b - ix + 1) % 3 - 1  # where that probe cell lies
                    for k, (ky, kx) in enumerate(_OFFSETS):
                        coef[k] += y * ((dy == ky) & (dx == kx))
            diag = coef[4]
            self.ops.append(lambda x, coef=coef: _apply_var(coef, x))
            self.diags.append(diag)
            self.unknown.append((diag > 0).to(diag.dtype))
            self.sizes.append((hc, wc))
        self.dinv = [torch.where(d > 0, self.OMEGA / d.clamp(min=torch.finfo(d.dtype).tiny), torch.zeros_like(d))
                     for d in self.diags]

    def __call__(self, r: torch.Tensor, level: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        op, dinv = self.ops[level], self.dinv[level]
        x = torch.mul(dinv, r, out=out)
        # in place where possible: on CPU a fresh full-size tensor costs several in-place passes
        if level + 1 < len(self.ops):
            # r - A x is already zero off the unknowns (A's rows there are zero)
            xc = self(_restrict(op(x).neg_().add_(r)), level + 1)
            x.addcmul_(_prolong(xc, self.sizes[level]), self.unknown[level], value=self.OVER)
        else:
            for _ in range(3):
                x.add_(op(x).neg_().add_(r).mul_(dinv))
        return x.add_(op(x).neg_().add_(r).mul_(dinv))


def impute(images: torch.Tensor, removed: torch.Tensor, noise: float = 0.01, seed: int | torch.Tensor = 0,
           tol: float = 1e-6, max_iter: int | None = None) -> torch.Tensor:
    """Noisy linear imputation of ``removed`` (N, H, W) bool pixels of ``images`` (N, C, H, W) in [0, 1].

    Solves every (image, channel) system at once by multigrid-preconditioned CG (see the module doc),
    then adds N(0, noise²) to the imputed pixels (seeded per row: ``seed + i`` or ``seed[i]``)."""
    n, c, h, w = images.shape
    if not bool((~removed).flatten(1).any(1).all()):
        raise ConfigError("linear imputation needs at least one known pixel per image (100 % removal is singular)")
    dt = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    img = images.to(dt)
    rm = removed.to(device=img.device, dtype=dt)[:, None]  # (N, 1, H, W), 1 = unknown
    s = neighbours(torch.ones(1, 1, h, w, dtype=dt, device=img.device))

    bufs: dict = {}

    def buf(key, like):
        b = bufs.get(key)
        if b is None or b.shape != like.shape:
            b = bufs[key] = torch.empty_like(like)
        return b

    def apply(x, key="cg"):  # A x on the unknowns (x is zero on known pixels), into a reused buffer
        return neighbours(x, buf(key, x), buf("tmp", x)).neg_().addcmul_(s, x).mul_(rm)

    def dot(u, v):  # per system; bmm needs no full-size temporary
        return torch.bmm(u.reshape(n * c, 1, h * w), v.reshape(n * c, h * w, 1)).view(n, c, 1, 1)

    def resmax(u):
        lo, hi = torch.aminmax(u.flatten(2), dim=-1)
        return torch.maximum(hi, -lo)[..., None, None]

    precond = _Multigrid(lambda x: apply(x, "mg"), rm * s, rm)
    known = img * (1 - rm)
    r = rm * neighbours(known)
    x = torch.zeros_like(img)
    z = precond(r)
    p = z.clone()
    rz = dot(r, z)
    cap = max_iter if max_iter is not None else 100
    active = resmax(r) > tol
    tiny = torch.finfo(dt).tiny
    it = 0
    while bool(active.any()) and it < cap:
        ap = apply(p)
        pap = dot(p, ap)
        alpha = torch.where(active, rz / pap.clamp(min=tiny), torch.zeros_like(rz))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        active = active & (resmax(r) > tol)
        z = precond(r, out=z)  # the previous z is no longer needed
        rz_new = dot(r, z)
        beta = torch.where(active, rz_new / rz.clamp(min=tiny), torch.zeros_like(rz))
        p = p.mul_(beta).add_(z)
        rz = rz_new
        it += 1
    if bool(active.any()):
        warnings.warn(f"linear imputation: {int(active.sum())} of {active.numel()} systems above "
                      f"tol={tol} after {cap} CG iterations", ImputationWarning, stacklevel=2)
    out = known + rm * x
    if noise:
        out = out + noise * rm * _randn(_seed_list(seed, n), (c, h, w), img.device, dt)
    return out.to(images.dtype)


@dataclass
class RoadResult:
    clean: torch.Tensor         # (B,) target probability of the unmodified image
    morf: torch.Tensor          # (B, P) after removing the p % most relevant pixels
    lerf: torch.Tensor          # (B, P) after removing the p % least relevant pixels
    road: torch.Tensor          # (B,) mean_p (lerf - morf) / 2; NaN when the map is unusable
    morf_random: torch.Tensor   # (B, P) the same for a seeded uniform-noise map
    lerf_random: torch.Tensor
    road_random: torch.Tensor   # (B,)
    reason: list               # (B,) None, or why road is NaN
    percentiles: tuple = field(default=PERCENTILES)

    def rows(self) -> list[dict]:
        """Host-side values, one dict per image."""
        cols = {k: getattr(self, k).cpu().tolist() for k in ("clean", "road", "road_random", "morf", "lerf")}
        rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        for row, why in zip(rows, self.reason):
            row["reason"] = why
        return rows


def _map_reason(m: torch.Tensor) -> str | None:
    if not bool(torch.isfinite(m).all()):
        return "non-finite map"
    if not bool((m != 0).any()):
        return "all-zero map"
    return None


def road(predict: Callable[[torch.Tensor], torch.Tensor], images01: torch.Tensor, maps: torch.Tensor,
         targets: torch.Tensor, percentiles: Sequence[float] = PERCENTILES, seed: int | torch.Tensor = 0,
         chunk: int = 64, noise: float = 0.01, random_baseline: bool = True, tol: float = 1e-6) -> RoadResult:
    """ROAD MoRF/LeRF curves and score per image (see the module doc).

    ``predict`` maps a (n, 3, H, W) batch in [0, 1] pixel space to class probabilities (n, K) (the
    caller wraps normalisation and softmax). ``maps`` (B, h, w) raw CAMs, ``targets`` (B,) class
    indices. ``chunk`` imputed images per solve and per ``predict`` call. ``noise``: std of the
    imputation noise in pixel units (0 for a deterministic imputation); ``random_baseline=False``
    skips the random-map curves (half the work; their fields stay NaN); ``tol``: see :func:`impute`."""
    b, _, h, w = images01.shape
    if maps.shape[0] != b or targets.shape[0] != b:
        raise ConfigError(f"ROAD: {b} images, {maps.shape[0]} maps, {targets.shape[0]} targets")
    if chunk < 1:
        raise ConfigError(f"ROAD chunk must be >= 1, got {chunk}")
    percentiles = tuple(percentiles)
    check_percentiles(percentiles, (h, w))
    dev = images01.device
    seeds = _seed_list(seed, b)
    n_p = len(percentiles)
    nan = torch.full((b, n_p), math.nan, device=dev)
    res = {k: nan.clone() for k in ("morf", "lerf", "morf_random", "lerf_random")}
    clean = torch.full((b,), math.nan, device=dev)
    reason = [_map_reason(maps[i]) for i in range(b)]
    ok = [i for i in range(b) if reason[i] is None]
    targets = targets.to(dev)

    with torch.no_grad():
        for j in range(0, len(ok), chunk):
            sel = ok[j:j + chunk]
            clean[sel] = predict(images01[sel]).float().gather(1, targets[sel, None])[:, 0]
        if not ok:
            return _result(clean, res, reason, percentiles)
        okt = torch.tensor(ok, device=dev)
        ok_seeds = [seeds[i] for i in ok]
        kinds = [("morf", "lerf", removal_order(maps[okt], (h, w), torch.tensor(ok_seeds)))]
        if random_baseline:
            rnd = _randn([_derive(s, _STREAM_RANDOM_MAP) for s in ok_seeds], (h, w), dev, torch.float32, uniform=True)
            tie_seeds = torch.tensor([_derive(s, _STREAM_RANDOM_TIES) for s in ok_seeds])
            kinds.append(("morf_random", "lerf_random", removal_order(rnd, (h, w), tie_seeds)))
        # jobs: (position in ok, curve name, percentile index, ranks, MoRF?, map kind), image-major
        jobs = [(a, name, q, ranks, morf_first, kk)
                for a in range(len(ok))
                for kk, (mname, lname, ranks) in enumerate(kinds)
                for name, morf_first in ((mname, True), (lname, False))
                for q in range(n_p)]
        for j in range(0, len(jobs), chunk):
            part = jobs[j:j + chunk]
            removed = torch.stack([removal_masks(ranks[a:a + 1], (h, w), (percentiles[q],), mf)[0, 0]
                                   for a, _, q, ranks, mf, _ in part])
            rows = torch.tensor([ok[a] for a, *_ in part], device=dev)
            # imputation noise seed: per image and per (kind, direction, percentile), batch-independent
            jseeds = torch.tensor([_derive(ok_seeds[a], _STREAM_IMPUTE, (kk * 2 + (not mf)) * n_p + q)
                                   for a, _, q, _, mf, kk in part])
            filled = impute(images01[rows], removed, noise=noise, seed=jseeds, tol=tol)
            prob = predict(filled).float().gather(1, targets[rows, None])[:, 0]
            for name in res:  # one indexed write per curve, no per-element device sync
                idx = [i for i, job in enumerate(part) if job[1] == name]
                if idx:
                    res[name][rows[idx], torch.tensor([part[i][2] for i in idx], device=dev)] = prob[idx]
    return _result(clean, res, reason, percentiles)


def _result(clean, res, reason, percentiles) -> RoadResult:
    score = ((res["lerf"] - res["morf"]) / 2).mean(1)
    score_random = ((res["lerf_random"] - res["morf_random"]) / 2).mean(1)
    return RoadResult(clean, res["morf"], res["lerf"], score, res["morf_random"], res["lerf_random"],
                      score_random, reason, tuple(percentiles))


def ybroad(per_layer: dict[str, float] | list[tuple[str, float]]) -> dict:
    """Summary of ROAD over layers: max, mean and argmax over the layers whose score is not NaN;
    ``curve`` lists every layer in the given order (NaN kept, so positions line up)."""
    items = list(per_layer.items()) if isinstance(per_layer, dict) else [tuple(x) for x in per_layer]
    curve = [(str(k), float(v)) if v is not None else (str(k), math.nan) for k, v in items]
    good = [(k, v) for k, v in curve if not math.isnan(v)]
    if not good:
        return {"ybroad_max": math.nan, "ybroad_mean": math.nan, "best_layer": None, "curve": curve}
    best = max(good, key=lambda kv: kv[1])
    return {"ybroad_max": best[1], "ybroad_mean": sum(v for _, v in good) / len(good),
            "best_layer": best[0], "curve": curve}
