"""Sanity checks of a map: does it depend on the model and on the explained class?

* Model-parameter randomisation (Adebayo et al. 2018, Quantus' ``MPRT``): the maps of the model
  against the maps of a copy whose parameters are re-initialised cascading from the top. A map that
  stays the same (similarity near 1) does not explain the model.
* Random logit (Sixt et al. 2020, Quantus' ``RandomLogit``): the map of the explained class against
  the map of a seeded other class.

Similarities are computed per image, batched, on the maps' device:

* :func:`spearman` is ``scipy.stats.spearmanr`` of the flattened maps (average ranks for ties), which
  is what Quantus' ``correlation_spearman`` computes row by row;
* :func:`ssim` is ``skimage.metrics.structural_similarity`` with its defaults (7-wide uniform window,
  sample covariance, K1 = 0.01, K2 = 0.03, mean over the window-valid interior) and, unless given,
  ``data_range = max - min`` of both maps together, which is Quantus' ``ssim``. (B, h, w) maps get 2-D
  SSIM; (B, n) rows get 1-D SSIM, which is what Quantus' RandomLogit computes, since it hands
  ``ssim`` the flattened maps.

Re-initialisation follows Quantus' ``PyTorchModel.get_random_layer_generator``: the modules having
``reset_parameters`` in ``named_modules`` order (reversed for ``top_down``), each reset right after
seeding with ``seed + 1``. Here the seeding happens in a forked RNG, so the caller's global torch RNG
state is left as it was (Quantus leaves it seeded), and the caller's model is never touched: the
randomised model is a deep copy.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cam.engine import CamEngine
from ..cam.maps import upsample
from ..io.results import SANITY_FIELDS

Explainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, x, targets) -> (B, H, W) maps; ``targets`` are definite class indices."""

_K1, _K2, _WIN = 0.01, 0.03, 7


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """(B, n) -> 1-based ranks along dim 1, ties given their average rank."""
    s = v.sort(1).values.contiguous()
    lo = torch.searchsorted(s, v.contiguous(), right=False)
    hi = torch.searchsorted(s, v.contiguous(), right=True)
    return (lo + hi + 1).to(torch.float64) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of ``a`` and ``b`` (B, ...) flattened per row -> (B,) float64.

    NaN where a map is constant (as scipy)."""
    ra, rb = _ranks(a.flatten(1).double()), _ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.square().sum(1) * rb.square().sum(1)).sqrt()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-map SSIM -> (B,) float64: (B, h, w) maps in 2-D, (B, n) rows in 1-D.

    ``data_range`` None: per image ``max - min`` over both maps (Quantus). Maps must be at least 7
    wide in every spatial dimension (skimage's window)."""
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"ssim takes two (B, h, w) or (B, n) tensors of one shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if min(a.shape[1:]) < _WIN:
        raise ValueError(f"ssim needs maps at least {_WIN} wide, got {tuple(a.shape[1:])}")
    x, y = a.double(), b.double()
    if data_range is None:
        both = torch.cat([x.flatten(1), y.flatten(1)], 1)
        r = (both.amax(1) - both.amin(1)).abs()
    else:
        r = torch.as_tensor(data_range, dtype=torch.float64, device=x.device).expand(x.shape[0])
    r = r.view(-1, *[1] * (x.ndim - 1))
    pool = ((lambda t: F.avg_pool1d(t[:, None], _WIN, 1)[:, 0]) if x.ndim == 2
            else (lambda t: F.avg_pool2d(t[:, None], _WIN, 1)[:, 0]))
    n = _WIN ** (x.ndim - 1)
    cov_norm = n / (n - 1)
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (_K1 * r) ** 2, (_K2 * r) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _similarities(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"spearman": spearman(a, b)}
    if min(a.shape[1:]) >= _WIN:
        out["ssim"] = ssim(a, b)
    return out


def _names(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """The target layers' names in ``model``, to find the same layers in a deep copy of it."""
    names = {id(m): n for n, m in model.named_modules()}
    missing = [type(l).__name__ for l in layers if id(l) not in names]
    if missing:
        raise ValueError(f"target layers not in the model: {missing}")
    return [names[id(l)] for l in layers]


def cam_explainer(model: nn.Module, layers: Sequence[nn.Module], method: str = "gradcam") -> Explainer:
    """camgate's maps upsampled to the input size, for ``model`` or any deep copy of it: the target
    layers are found in the model explained by their names in ``model``."""
    layer_names = _names(model, layers)

    def explain(m: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        engine = CamEngine(m, [m.get_submodule(n) for n in layer_names], method)
        try:
            return upsample(engine(x, targets).cams, tuple(x.shape[-2:]))
        finally:
            engine.close()

    return explain


def _definite_targets(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Class indices; None or -1 entries become the model's prediction."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    if targets is None:
        return pred
    targets = torch.as_tensor(targets, device=pred.device)
    return torch.where(targets < 0, pred, targets)


def randomisable(model: nn.Module, order: str = "top_down") -> list[tuple[str, nn.Module]]:
    """The modules Quantus randomises, in the order it randomises them."""
    mods = [(n, m) for n, m in model.named_modules() if hasattr(m, "reset_parameters")]
    if order not in ("top_down", "bottom_up", "independent"):
        raise ValueError(f"order must be top_down, bottom_up or independent, got {order!r}")
    return mods[::-1] if order == "top_down" else mods


def _reset(module: nn.Module, seed: int, device: torch.device) -> None:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1)  # as Quantus: seed + 1 before every module's reset
        module.reset_parameters()


def randomised_copy(model: nn.Module, depth: int | None = None, *, seed: int = 0,
                    order: str = "top_down") -> nn.Module:
    """A deep copy of ``model`` with its first ``depth`` :func:`randomisable` modules (in ``order``; None =
    all of them) re-initialised, each seeded as Quantus seeds it. Every module's reset is seeded alike,
    so the cascade's end state does not depend on the depths visited before: ``depth=None`` is the
    last step of Quantus' cascading MPRT."""
    rand = copy.deepcopy(model)
    mods = randomisable(rand, order)
    if not mods:
        raise ValueError("the model has no module with reset_parameters to randomise")
    device = next(rand.parameters(), torch.empty(0)).device
    for _, m in mods[:depth]:
        _reset(m, seed, device)
    return rand


def randomisation_similarity(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor,
                             targets: torch.Tensor | None = None, *, method: str = "gradcam", seed: int = 0,
                             order: str = "top_down", depths: Sequence[int] | None = None,
                             explain: Explainer | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Similarity of each image's map to its map under model-parameter randomisation.

    ``depths``: how many modules of :func:`randomisable` (in ``order``) are re-initialised, cascading
    (``independent``: only the depth-th module); default 1 (the head), half of them, all. Returns
    ``{"<depth>:<module name>": {"spearman": (B,), "ssim": (B,)}}`` (ssim only for maps at least 7
    wide), every randomised model explaining the original model's target classes. ``explain``
    replaces camgate's maps (:func:`cam_explainer`); ``layers`` is then unused.
    """
    explain = explain or cam_explainer(model, layers, method)
    targets = _definite_targets(model, x, targets)
    original = explain(model, x, targets)
    n = len(randomisable(model, order))
    if n == 0:
        raise ValueError("the model has no module with reset_parameters to randomise")
    depths = sorted(set(depths if depths is not None else (1, (n + 1) // 2, n)))
    if depths[0] < 1 or depths[-1] > n:
        raise ValueError(f"depths must lie in 1..{n}, got {depths}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    rand = copy.deepcopy(model)
    mods = randomisable(rand, order)
    done = 0
    for d in depths:
        if order == "independent":
            rand = copy.deepcopy(model)
            mods = randomisable(rand, order)
            _reset(mods[d - 1][1], seed, x.device)
        else:
            for _, m in mods[done:d]:
                _reset(m, seed, x.device)
            done = d
        out[f"{d}:{mods[d - 1][0]}"] = _similarities(original, explain(rand, x, targets))
    return out


def other_classes(targets: torch.Tensor, num_classes: int, seed: int = 0,
                  rows: Sequence[int] | None = None) -> torch.Tensor:
    """Per image a class other than its target, uniform over the others, from a generator seeded by
    ``seed`` and the image's row (``rows``, default its position in the batch): one image's draw does
    not depend on the batch it comes in."""
    if num_classes < 2:
        raise ValueError("random logit needs at least two classes")
    rows = range(len(targets)) if rows is None else list(rows)
    if len(rows) != len(targets):
        raise ValueError(f"{len(targets)} targets but {len(rows)} rows")
    out = []
    for r, t in zip(rows, targets.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(r))
        k = int(torch.randint(num_classes - 1, (1,), generator=g))
        out.append(k + (k >= t))
    return torch.tensor(out, dtype=torch.long, device=targets.device)


def random_logit_similarity(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor,
                            targets: torch.Tensor | None = None, *, num_classes: int, method: str = "gradcam",
                            seed: int = 0, rows: Sequence[int] | None = None, others: torch.Tensor | None = None,
                            explain: Explainer | None = None) -> dict[str, torch.Tensor]:
    """Per image the similarity of the map of its target class to the map of another class
    (:func:`other_classes`, or ``others`` given): ``{"spearman": (B,), "ssim": (B,)}``, SSIM of the 2-D
    maps (only for maps at least 7 wide)."""
    explain = explain or cam_explainer(model, layers, method)
    targets = _definite_targets(model, x, targets)
    others = other_classes(targets, num_classes, seed, rows) if others is None else others.to(targets.device)
    if (others == targets).any():
        raise ValueError("an 'other' class equals the target class")
    return _similarities(explain(model, x, targets), explain(model, x, others))


SANITY_COLUMNS = tuple(n for n, _ in SANITY_FIELDS)


class SanityChecks:
    """Both checks on the maps of a :class:`CamEngine`, computed beside ROAD on the same images.

    Randomisation is done once, in full (every :func:`randomisable` module, the end of Quantus'
    top-down cascade, where a map that depends on the model must have changed); per batch it costs
    one map of the randomised copy and one map of each image's other class, the explained class's map
    being the one ROAD scores. Similarities are those of Quantus on the maps upsampled to the input,
    except that a map that came out constant (an all-zero Grad-CAM of a random model or of a class
    the image does not show) has similarity 0 with a non-constant one, where Spearman's formula
    gives NaN: it shares nothing with it."""

    def __init__(self, engine: CamEngine, num_classes: int, seed: int = 0):
        self.engine, self.num_classes, self.seed = engine, num_classes, seed
        self.randomised = len(randomisable(engine.model))
        rand = randomised_copy(engine.model, seed=seed)
        self.rand_engine = CamEngine(rand, [rand.get_submodule(n) for n in _names(engine.model, engine.layers)],
                                     engine.method, engine.reshape)

    def describe(self) -> dict:
        """What was checked, for the file's metadata and the test record."""
        return {"randomisation": f"all {self.randomised} parameterised modules re-initialised (top-down cascade "
                                 f"to the end), seeded {self.seed} + 1 per module as Quantus",
                "random_logit": f"one other class per image, uniform over the other {self.num_classes - 1}, "
                                f"seeded by seed {self.seed} and the image's row",
                "similarity": "Spearman rank correlation and SSIM of the maps upsampled to the model input "
                              "(1 = the same map); a constant map against another: 0",
                "modules_randomised": self.randomised, "seed": self.seed}

    def __call__(self, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                 rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """``maps`` (B, h, w): the engine's maps of ``x`` for ``targets``; ``rows``: each image's manifest
        row (seeds its other class). -> {column: (B,)} for :data:`SANITY_COLUMNS`."""
        size = tuple(x.shape[-2:])
        orig = upsample(maps.float(), size)
        others = other_classes(targets, self.num_classes, self.seed, rows)
        out = {}
        for name, m in (("randomised", self.rand_engine(x, targets).cams),
                        ("random_logit", self.engine(x, others).cams)):
            sims = _similarities(orig, upsample(m.float(), size))
            flat = orig.flatten(1)
            defined = (flat.amax(1) > flat.amin(1)).to(sims["spearman"].device)
            # NaN only because the other map is constant: it shares no ranking with this one
            out[f"{name}_spearman"] = torch.where(sims["spearman"].isnan() & defined,
                                                  torch.zeros_like(sims["spearman"]), sims["spearman"])
            out[f"{name}_ssim"] = sims.get("ssim", torch.full_like(sims["spearman"], float("nan")))
        out["random_logit_class"] = others
        return {c: out[c] for c in SANITY_COLUMNS}

    def close(self) -> None:
        self.rand_engine.close()
