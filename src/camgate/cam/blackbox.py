"""Black-box saliency: DE-CAM and RISE, from the model's output probabilities only.

Both methods show the model masked copies of each image and turn (mask, target probability) pairs
into a map. They need only a :class:`camgate.model.backends.Backend` (``probs(x)``), so they work for ONNX
exports and vendor models. The forward-pass budget is exact: each method evaluates ``budget``
masked images per image, no more (``backend.calls`` grows by ``budget * B``; resolving targets
given as -1 costs one extra pass per such image).

Shared choices (reasons in docs/decam.md):
  * Masked image ``x*m + fill*(1-m)``, with ``m`` a g x g grid upsampled bilinearly
    (``align_corners=False``, the engine's upsampling) to the input size.
  * Seeded per image: every random number an image uses comes from its own CPU
    ``torch.Generator(seed)``, drawn up front in a fixed order, so a map does not depend on which
    other images share the batch and re-runs on the same machine are bit-identical.
  * Batched: the masked images of all images of one step (one DE generation, one RISE chunk) go to
    the backend together, in chunks of ``max_batch`` images.

DE-CAM (after Karatsiolis & Kamilaris, VISAPP 2023; the design here is our own):
  * candidate: a g x g mask in [0, 1] (g=7: 49 numbers, coarse enough for DE to search, fine enough
    for objects of ~1/7 of the image);
  * fill: a heavily blurred copy of the image (sigma = size/10), which removes local evidence
    without adding the sharp, out-of-distribution edges a constant fill draws along mask borders;
  * fitness: p_target(masked) - lam_area * mean(m) - lam_tv * TV(m), i.e. the smallest, smoothest
    region that keeps the class (a preservation objective);
  * DE/rand/1/bin, population 16, F=0.8, CR=0.3 (current-to-best/1 as ``variant=``), greedy
    one-to-one selection, bounds by reflection; initial population uniform in [0, 1]^49; the last
    generation is cut short so that initial population + generations * population = budget exactly;
  * map: the ridge-regression slope of the target probability on the 49 mask cells, fitted per
    image over EVERY evaluated candidate (all ``budget`` of them, not only the single best), clipped
    at 0: how much keeping each cell raises the class probability. Regression, unlike a weighted
    average of masks, does not mistake where the evolution happened to sample for evidence (the
    evolved population is dense where the best mask is, evidence or not). Alternatives kept as
    ``weighting=``: 'excess' (masks weighted by fitness above the random population's median),
    'prob' (RISE's weights), 'best' (the best mask); all measured worse, see docs/decam.md.
    Returned at grid resolution (B, g, g): the slopes are per cell, and ``engine.upsample`` to
    (H, W) uses the same bilinear interpolation the masks were shown with.

RISE (Petsiuk et al., BMVC 2018): N = budget random binary s x s grids (p=0.5), upsampled bilinearly
to (s+1) cells and cropped at a random shift; saliency = sum_i p_target(masked_i) * M_i / (N * p),
zero fill (the normalised input's mean colour) as in the paper; returned at input resolution.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..settings import default

FILLS = ("blur", "zero", "mean")
WEIGHTINGS = ("excess", "prob", "best", "regression")
VARIANTS = ("current-to-best/1", "rand/1")


# --- shared helpers -----------------------------------------------------------------------------

def _seed_list(seeds, n: int) -> list[int]:
    """None/int -> the same seed for every image; a sequence/tensor -> one seed per image."""
    if seeds is None:
        return [0] * n
    if isinstance(seeds, int):
        return [seeds] * n
    s = [int(v) for v in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    if len(s) != n:
        raise ConfigError(f"{len(s)} seeds for {n} images")
    return s


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (no dark border), per image and channel."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs pad < size
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum())
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def fill_image(x: Tensor, fill: str = "blur", sigma: float | None = None) -> Tensor:
    """What a masked-out pixel shows. 'blur': a blurred copy (sigma default = min(H, W)/10);
    'zero': 0 in normalised space = the data set's mean colour; 'mean': each image's mean colour."""
    if fill == "blur":
        return gaussian_blur(x, min(x.shape[-2:]) / 10 if sigma is None else sigma)
    if fill == "zero":
        return torch.zeros_like(x)
    if fill == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).contiguous()
    raise ConfigError(f"fill must be one of {FILLS}, got {fill!r}")


def resolve_targets(backend, x: Tensor, targets) -> Tensor:
    """(B,) class per image; None or -1 entries = the predicted class (one forward pass each).
    (B, T): T classes per image (RISE explains them all with the same masks), none of them -1."""
    B = x.shape[0]
    if targets is None:
        targets = torch.full((B,), -1, dtype=torch.long)
    t = torch.as_tensor(targets, dtype=torch.long).cpu()
    if t.ndim == 2:
        if t.shape[0] != B:
            raise ConfigError(f"{t.shape[0]} target rows for {B} images")
        if t.numel() and (t.min() < 0 or t.max() >= backend.num_classes):
            bad = int(t[(t < 0) | (t >= backend.num_classes)][0])
            raise ConfigError(f"target class {bad} out of range for {backend.num_classes} classes")
        return t.to(x.device)
    t = t.reshape(-1)
    if t.numel() != B:
        raise ConfigError(f"{t.numel()} targets for {B} images")
    need = (t < 0).nonzero().flatten()
    if need.numel():
        t = t.clone()
        t[need] = backend.probs(x[need.to(x.device)]).argmax(1).cpu()
    if (t >= backend.num_classes).any():
        raise ConfigError(f"target class {int(t.max())} out of range for {backend.num_classes} classes")
    return t.to(x.device)


class _Timer:
    """Splits wall time into model time (backend calls) and the rest (the method's bookkeeping)."""

    def __init__(self):
        self.model = 0.0
        self.t0 = time.perf_counter()

    def probs(self, backend, xs: Tensor) -> Tensor:
        t = time.perf_counter()
        p = backend.probs(xs)
        self.model += time.perf_counter() - t
        return p

    def report(self, stats: dict | None, images: int, evaluations: int):
        if stats is not None:
            total = time.perf_counter() - self.t0
            stats.update(total_s=total, model_s=self.model, bookkeeping_s=total - self.model,
                         bookkeeping_share=(total - self.model) / total if total else 0.0,
                         images=images, evaluations=evaluations)


def _blocks(B: int, N: int, max_batch: int):
    """(i0, i1, j0, j1): images i0:i1 x candidates j0:j1, image-major, at most ~max_batch each;
    whole images per block when they fit, so the fill and the image broadcast instead of gathering."""
    k, step = max(1, max_batch // N), min(N, max_batch)
    for i0 in range(0, B, k):
        for j0 in range(0, N, step):
            yield i0, min(i0 + k, B), j0, min(j0 + step, N)


def _masked_probs(backend, timer: _Timer, x: Tensor, base: Tensor, masks: Tensor, tgt: Tensor,
                  max_batch: int) -> Tensor:
    """masks (B, N, g, g) in [0, 1] -> (B, N) target probabilities of x*m + base*(1-m)."""
    B, N, g, _ = masks.shape
    H, W = x.shape[-2:]
    out = torch.empty(B, N, device=x.device)
    diff = x - base  # once, not per block
    for i0, i1, j0, j1 in _blocks(B, N, max_batch):
        ni, nj = i1 - i0, j1 - j0
        m = F.interpolate(masks[i0:i1, j0:j1].reshape(ni * nj, 1, g, g), size=(H, W), mode="bilinear",
                          align_corners=False).view(ni, nj, 1, H, W)
        xs = torch.addcmul(base[i0:i1, None], diff[i0:i1, None], m)  # base + (x - base) * m
        p = timer.probs(backend, xs.view(ni * nj, -1, H, W)).to(x.device).view(ni, nj, -1)
        out[i0:i1, j0:j1] = p.gather(2, tgt[i0:i1, None, None].expand(ni, nj, 1))[..., 0]
    return out


def check_budget(budget: int) -> None:
    """A black-box method's forward passes per image (runners check it before any data is read)."""
    if int(budget) < 1:
        raise ConfigError(f"budget must be >= 1 forward pass per image, got {budget}")


def _check(budget: int, grid: int):
    check_budget(budget)
    if int(grid) < 2:
        raise ConfigError(f"grid must be >= 2, got {grid}")


# --- DE-CAM ---------------------------------------------------------------------------------------

def total_variation(m: Tensor) -> Tensor:
    """(..., g, g) -> (...,): mean absolute difference between 4-neighbours of the grid."""
    dh = (m[..., 1:, :] - m[..., :-1, :]).abs().mean((-2, -1))
    dw = (m[..., :, 1:] - m[..., :, :-1]).abs().mean((-2, -1))
    return (dh + dw) / 2


def decam(backend, x: Tensor, targets=None, budget: int = default("budget"), seeds=None, grid: int = 7,
          pop: int = 16, f: float = 0.8, cr: float = 0.3, variant: str = "rand/1",
          lam_area: float = 0.3, lam_tv: float = 0.1,
          fill: str = "blur", sigma: float | None = None, strategy: str = "de", weighting: str = "regression",
          max_batch: int = 256, stats: dict | None = None) -> Tensor:
    """DE-CAM maps (B, grid, grid), float32, non-negative, on x's device.

    ``strategy='random'`` evaluates ``budget`` random candidates of the same space with the same
    fitness and map (no evolution): the baseline that shows what the evolution itself buys.
    """
    _check(budget, grid)
    if strategy not in ("de", "random"):
        raise ConfigError(f"strategy must be 'de' or 'random', got {strategy!r}")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if pop < 4:
        raise ConfigError(f"pop must be >= 4 (a member needs 3 distinct partners), got {pop}")
    timer = _Timer()
    B, D = x.shape[0], grid * grid
    x = x.float()
    tgt = resolve_targets(backend, x, targets)
    seeds = _seed_list(seeds, B)
    base = fill_image(x, fill, sigma)
    p0 = budget if strategy == "random" else min(pop, budget)
    rest = budget - p0
    gens = math.ceil(rest / pop)
    # all randomness per image, drawn up front from its own generator in a fixed order
    init, u, jr, partners = [], [], [], []
    not_self = torch.eye(pop, dtype=torch.bool)
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        init.append(torch.rand(p0, D, generator=g))
        u.append(torch.rand(gens, pop, D, generator=g))
        jr.append(torch.randint(0, D, (gens, pop), generator=g))
        # three distinct partners per member, none the member itself: a random order of the others
        r = torch.rand(gens, pop, pop, generator=g).masked_fill(not_self, 2.0)
        partners.append(r.argsort(-1)[..., :3])
    dev = x.device
    popu = torch.stack(init).to(dev)  # (B, P0, D)

    def fitness(m: Tensor) -> tuple[Tensor, Tensor]:
        grids = m.view(B, -1, grid, grid)
        p = _masked_probs(backend, timer, x, base, grids, tgt, max_batch)
        return p - lam_area * m.mean(-1) - lam_tv * total_variation(grids), p

    fit, prob = fitness(popu)
    ref = fit.median(1, keepdim=True).values  # what a random mask achieves: the weights' zero
    seen, seen_fit, seen_p = [popu.clone()], [fit.clone()], [prob]  # popu/fit change in place below
    if gens:
        u, jr = torch.stack(u).to(dev), torch.stack(jr).to(dev)
        partners = torch.stack(partners).to(dev)  # (B, G, P, 3)
        ar = torch.arange(pop, device=dev)
        rows = torch.arange(B, device=dev)[:, None]
        for k in range(gens):
            n = min(pop, rest - k * pop)  # the last generation may be cut short to fit the budget
            best = popu[rows[:, 0], fit.argmax(1)][:, None]  # (B, 1, D)
            r0, r1, r2 = (popu[rows, partners[:, k, :n, j]] for j in range(3))
            xi = popu[:, :n]
            if variant == "rand/1":  # explores longer: no pull towards the best
                v = r0 + f * (r1 - r2)
            else:  # current-to-best/1: converges fast, keeps each member's own position in the mix
                v = xi + f * (best - xi) + f * (r1 - r2)
            v = torch.where(v < 0, -v, v)  # reflection keeps the step's length, clipping piles up on 0/1
            v = torch.where(v > 1, 2 - v, v).clamp(0, 1)
            cross = u[:, k, :n] < cr
            cross[rows, ar[:n], jr[:, k, :n]] = True  # at least one gene from the mutant
            trial = torch.where(cross, v, xi)
            tf, tp = fitness(trial)
            keep = tf >= fit[:, :n]  # >=: lets the population drift across plateaus
            popu[:, :n] = torch.where(keep[..., None], trial, xi)
            fit[:, :n] = torch.where(keep, tf, fit[:, :n])
            seen.append(trial)
            seen_fit.append(tf)
            seen_p.append(tp)
    masks, fits, probs = torch.cat(seen, 1), torch.cat(seen_fit, 1), torch.cat(seen_p, 1)  # all evaluated
    if weighting == "regression":
        maps = _ridge(masks, probs).clamp(min=0)
    else:
        if weighting == "excess":  # how much better than a random mask
            w = (fits - ref).clamp(min=0)
        elif weighting == "prob":  # RISE's weights on the evolved samples
            w = probs
        else:  # 'best': the single best candidate
            w = (fits == fits.max(1, keepdim=True).values).float()
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # nothing beat chance: plain mean
        maps = (w[..., None] * masks).sum(1) / w.sum(1, keepdim=True)
    timer.report(stats, B, B * budget)
    if stats is not None:  # the single best candidate per image, for inspection and comparison
        stats["best"] = popu[torch.arange(B, device=dev), fit.argmax(1)].view(B, grid, grid)
    return maps.view(B, grid, grid).float()


def _ridge(m: Tensor, p: Tensor, alpha: float = 1e-2) -> Tensor:
    """Per image, the ridge-regression slopes of p (B, N) on the mask cells m (B, N, D).

    One image at a time: batched matrix products group rows differently for different batch sizes,
    which would make a map depend (in the last bits) on its neighbours in the batch."""
    out = []
    eye = alpha * m.shape[1] * torch.eye(m.shape[2], device=m.device)
    for mi, pi in zip(m, p):
        mc, pc = mi - mi.mean(0), pi - pi.mean()
        out.append(torch.linalg.solve(mc.T @ mc + eye, mc.T @ pc))
    return torch.stack(out)


def random_search(backend, x: Tensor, targets=None, budget: int = default("budget"), **kw) -> Tensor:
    """DE-CAM's candidate space, fitness and map with ``budget`` random candidates (no evolution)."""
    return decam(backend, x, targets, budget, strategy="random", **kw)


# --- RISE ------------------------------------------------------------------------------------------

def rise_draws(seeds, B: int, budget: int, grid: int, p: float, size: tuple[int, int], device) -> tuple:
    """RISE's random numbers, per image from its own ``torch.Generator(seed)`` in a fixed order:
    (bits (B, N, s, s) float, dy (B, N), dx (B, N), grid, cell size (ch, cw)) on ``device``."""
    H, W = size
    ch, cw = math.ceil(H / grid), math.ceil(W / grid)
    bits, dy, dx = [], [], []
    for s in _seed_list(seeds, B):
        g = torch.Generator().manual_seed(s)
        bits.append(torch.rand(budget, grid, grid, generator=g) < p)
        dy.append(torch.randint(0, ch, (budget,), generator=g))
        dx.append(torch.randint(0, cw, (budget,), generator=g))
    return (torch.stack(bits).to(device).float(), torch.stack(dy).to(device), torch.stack(dx).to(device),
            grid, (ch, cw))


def rise_masks(draws: tuple, i0: int, i1: int, j0: int, j1: int, size: tuple[int, int]) -> Tensor:
    """The masks of images i0:i1 x candidates j0:j1, ((i1-i0)*(j1-j0), H, W), image-major: each s x s
    grid upsampled bilinearly to (s+1) cells and cropped H x W at its random shift (dy, dx)."""
    bits, dy, dx, grid, (ch, cw) = draws
    H, W = size
    dev = bits.device
    n = (i1 - i0) * (j1 - j0)
    up = F.interpolate(bits[i0:i1, j0:j1].reshape(n, 1, grid, grid),
                       size=((grid + 1) * ch, (grid + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    oy, ox = dy[i0:i1, j0:j1].reshape(n, 1), dx[i0:i1, j0:j1].reshape(n, 1)
    ys, xs = torch.arange(H, device=dev), torch.arange(W, device=dev)
    return up[torch.arange(n, device=dev)[:, None, None], (oy + ys)[:, :, None], (ox + xs)[:, None, :]]


def rise(backend, x: Tensor, targets=None, budget: int = default("budget"), seeds=None, grid: int = 7, p: float = 0.5,
         fill: str = "zero", sigma: float | None = None, max_batch: int = 256,
         stats: dict | None = None) -> Tensor:
    """RISE maps (B, H, W), float32, non-negative, on x's device; ``budget`` masks per image.

    ``targets`` (B, T) explains T classes per image from the same ``budget`` masked passes: maps
    (B, T, H, W), each equal to the map of that class alone."""
    _check(budget, grid)
    if not 0 < p < 1:
        raise ConfigError(f"p must be in (0, 1), got {p}")
    timer = _Timer()
    B, (H, W) = x.shape[0], x.shape[-2:]
    x = x.float()
    tgt = resolve_targets(backend, x, targets)
    several = tgt.ndim == 2
    tgt = tgt if several else tgt[:, None]  # (B, T)
    T = tgt.shape[1]
    base = fill_image(x, fill, sigma)
    dev = x.device
    draws = rise_draws(seeds, B, budget, grid, p, (H, W), dev)
    sal = torch.zeros(B, T, H, W, device=dev)
    diff = x - base
    for i0, i1, j0, j1 in _blocks(B, budget, max_batch):
        ni, nj = i1 - i0, j1 - j0
        n = ni * nj
        m = rise_masks(draws, i0, i1, j0, j1, (H, W)).view(ni, nj, 1, H, W)
        xs = torch.addcmul(base[i0:i1, None], diff[i0:i1, None], m).view(n, -1, H, W)
        pt = timer.probs(backend, xs).to(dev).view(ni, nj, -1).gather(2, tgt[i0:i1, None, :].expand(ni, nj, T))
        owner = torch.arange(i0, i1, device=dev).repeat_interleave(nj)
        # sequential: chunking-independent
        sal.index_add_(0, owner, (pt[..., None, None] * m[:, :, :1]).view(n, T, H, W))
    timer.report(stats, B, B * budget)
    sal = (sal / (budget * p)).float()
    return sal if several else sal[:, 0]


METHODS = {"decam": decam, "rise": rise}


def explain(backend, x: Tensor, method: str = "decam", targets=None, budget: int = default("budget"), seeds=None,
            **kw):
    """A :class:`camgate.cam.engine.CamBatch` from a black box: one clean pass (the model's
    scores, which also resolve -1 targets) plus ``budget`` masked passes per image.

    ``logits`` holds log-probabilities: their softmax and argmax are the model's own."""
    from .maps import CamBatch

    if method not in METHODS:
        raise ConfigError(f"unknown black-box method {method!r}; known: {sorted(METHODS)}")
    probs = backend.probs(x.float()).to(x.device)
    pred = probs.argmax(1)
    t = pred if targets is None else torch.as_tensor(targets, dtype=torch.long, device=x.device)
    t = torch.where(t < 0, pred, t)
    cams = METHODS[method](backend, x, t, budget=budget, seeds=seeds, **kw)
    return CamBatch(probs.clamp_min(1e-12).log(), t, cams)
