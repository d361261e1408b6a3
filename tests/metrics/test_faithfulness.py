"""ROAD scoring against a direct sparse solve and against pytorch-grad-cam's ROAD."""
import math

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric, RemoveLeastRelevantFirst,
                                                              RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from camgate.errors import ConfigError
from camgate.metrics.road import (PERCENTILES, ImputationWarning, check_percentiles, impute, neighbours, removal_masks,
                                  removal_order, road, ybroad)

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one torch thread


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def direct_solve(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The imputation system built entry by entry and solved by scipy's spsolve (float64)."""
    h, w = removed.shape
    idx = -np.ones((h, w), int)
    unknown = np.argwhere(removed)
    idx[removed] = np.arange(len(unknown))
    a = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), img.shape[0]))
    for row, (y, x) in enumerate(unknown):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                    continue
                wgt = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
                a[row, row] += wgt
                if removed[yy, xx]:
                    a[row, idx[yy, xx]] -= wgt
                else:
                    rhs[row] += wgt * img[:, yy, xx]
    sol = scipy.sparse.linalg.spsolve(a.tocsc(), rhs).reshape(len(unknown), -1)
    out = img.astype(np.float64).copy()
    out[:, removed] = sol.T
    return out


def test_stencil_matches_conv2d():
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]).view(1, 1, 3, 3)
    ref = F.conv2d(x.view(-1, 1, 9, 11), k, padding=1).view_as(x)
    assert torch.allclose(neighbours(x.clone()), ref, atol=1e-6)


def test_impute_equals_sparse_direct_solve():
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(3, 3, 20, 24, generator=g)
    masks = torch.rand(3, 20, 24, generator=g) < 0.3     # scattered, border pixels included
    masks[1] = False
    masks[1, 2:17, 3:21] = True                           # a large hole
    masks[2, :, :2] = True                                # whole border columns, corners
    masks[2, 0, :] = True
    masks[0, 0, 0] = masks[0, -1, -1] = True
    got = impute(imgs, masks, noise=0.0)
    for i in range(3):
        ref = direct_solve(imgs[i].numpy(), masks[i].numpy())
        assert np.abs(got[i].numpy() - ref).max() <= 1e-5
        assert torch.equal(got[i][:, ~masks[i]], imgs[i][:, ~masks[i]])  # known pixels untouched
    # odd sizes (the multigrid pads its coarse levels) and a single known pixel
    odd = torch.rand(2, 3, 13, 17, generator=g)
    holes = torch.rand(2, 13, 17, generator=g) < 0.6
    holes[1] = True
    holes[1, 6, 8] = False
    got = impute(odd, holes, noise=0.0)
    err = [np.abs(got[i].numpy() - direct_solve(odd[i].numpy(), holes[i].numpy())).max() for i in range(2)]
    # one known pixel is the worst-conditioned case: the residual tolerance 1e-6 allows more error
    assert err[0] <= 1e-5 and err[1] <= 1e-4


def test_impute_warns_when_not_converged():
    imgs = torch.rand(1, 3, 32, 32)
    holes = torch.zeros(1, 32, 32, dtype=torch.bool)
    holes[0, 4:28, 4:28] = True
    with pytest.warns(ImputationWarning, match="after 1 CG iterations"):
        impute(imgs, holes, noise=0.0, max_iter=1)


def test_impute_noise_only_on_removed_and_seeded():
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(2, 3, 16, 16, generator=g)
    masks = torch.rand(2, 16, 16, generator=g) < 0.5
    clean = impute(imgs, masks, noise=0.0)
    a = impute(imgs, masks, noise=0.01, seed=torch.tensor([7, 8]))
    b = impute(imgs[1:], masks[1:], noise=0.01, seed=torch.tensor([8]))
    assert torch.equal(a[1], b[0])
    d = (a - clean)
    assert torch.equal(d[:, :, ~masks[0]][0], torch.zeros_like(d[:, :, ~masks[0]][0]))
    assert 0.007 < d[0][:, masks[0]].std().item() < 0.013


def tiny_resnet():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=5).eval()
    return m


def test_against_pytorch_grad_cam_road():
    """Same images, maps, model as pytorch-grad-cam's ROAD.

    Imputations agree to float precision with the noise off: the system is the same and affine-
    equivariant, so imputing in [0, 1] then normalising equals imputing the normalised tensor.
    The curves differ slightly even with the noise off, because (1) its percentile p keeps the pixels
    strictly below ``np.percentile(cam, p)`` (interpolated), i.e. removes (100 - p) %, and that count
    can differ from round((100-p) % · H·W) by one pixel; (2) our 1e-4 tie-breaking noise reorders
    pixels whose scaled values are that close. With its noise on, the noise is 0.01 in normalised
    units (ours: 0.01 in pixel units) and the draws differ, so only the ROAD score is compared, loosely.
    """
    model = tiny_resnet()
    g = torch.Generator().manual_seed(3)
    h = w = 32
    x01 = torch.rand(3, 3, h, w, generator=g)
    x01[:, :, 8:20, 10:26] = torch.rand(3, 3, 1, 1, generator=g)   # some structure for the model
    raw = torch.rand(3, 7, 7, generator=g)
    cams = F.interpolate(raw[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    targets = torch.tensor([0, 3, 1])
    xn = (x01 - MEAN) / STD

    def predict(x):
        return torch.softmax(model((x - MEAN) / STD), 1)

    # imputation, noise off: theirs on the normalised tensor, ours in pixel space
    removed = removal_masks(removal_order(raw, (h, w), 0), (h, w), (30, 70), True)[:, 1]
    ours = (impute(x01, removed, noise=0.0) - MEAN) / STD
    for i in range(3):
        theirs = NoisyLinearImputer(noise=0.0)(xn[i].clone(), (~removed[i]).float())
        assert torch.allclose(ours[i], theirs, atol=1e-4)  # 1e-4 normalised = 2.3e-5 in pixel units

    # curves, noise off, through its own building blocks; its p keeps p %, ours removes p %
    res = road(predict, x01, raw, targets, noise=0.0, random_baseline=False)
    tgt = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    for name, cls, ours_curve in (("morf", RemoveMostRelevantFirst, res.morf),
                                  ("lerf", RemoveLeastRelevantFirst, res.lerf)):
        theirs = np.stack([PerturbationConfidenceMetric(cls(100 - p, NoisyLinearImputer(noise=0.0)))(
            xn, cams.numpy(), tgt, model, return_diff=False) for p in PERCENTILES], 1)
        spread = (theirs.max(1) - theirs.min(1)).min()
        assert spread > 0.01, "the model must react to removal for the comparison to mean anything"
        diff = np.abs(ours_curve.numpy() - theirs)
        assert np.median(diff) <= 1e-5, name   # same pixels removed: same probability
        assert diff.max() <= 0.01, name        # a pixel more or less at a few percentiles

    # ROAD score with both noises on (different units and draws): loosely equal
    theirs = ROADCombined(percentiles=list(PERCENTILES))(xn, cams.numpy(), tgt, model)
    with_noise = road(predict, x01, raw, targets, random_baseline=False)
    assert np.abs(with_noise.road.numpy() - theirs).max() <= 0.005


def test_exact_count_with_ties():
    h, w = 13, 17
    n = h * w
    flat = torch.ones(2, 4, 4)
    flat[1] = 0.5
    rank = removal_order(flat, (h, w), 5)
    assert torch.equal(rank.sort(1).values, torch.arange(n).expand(2, n))
    for mf in (True, False):
        masks = removal_masks(rank, (h, w), PERCENTILES, mf)
        for q, p in enumerate(PERCENTILES):
            assert masks[:, q].flatten(1).sum(1).tolist() == [math.floor(p / 100 * n + 0.5)] * 2
    # a plateau: the 20 % removal takes all of the top plateau and nothing below it
    plateau = torch.zeros(1, h, w)
    plateau[0, :4, :] = 1.0                               # 68 of 221 pixels, tied
    m = removal_masks(removal_order(plateau, (h, w), 0), (h, w), (20, 40), True)[0]
    assert m[0].sum() == 44 and m[0][4:].sum() == 0
    assert m[1][:4].all() and m[1].sum() == 88


def test_unusable_maps_give_nan_and_reason():
    model = tiny_resnet()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5))
    maps[0] = 0.0
    maps[2, 1, 1] = math.nan
    res = road(lambda t: torch.softmax(model(t), 1), x, maps, torch.tensor([0, 1, 2]), chunk=32)
    assert res.reason[0] == "all-zero map" and res.reason[2] == "non-finite map" and res.reason[1] is None
    assert math.isnan(res.road[0]) and math.isnan(res.road[2]) and math.isnan(res.road_random[0])
    assert math.isfinite(res.road[1]) and math.isfinite(res.road_random[1])
    assert res.rows()[0]["reason"] == "all-zero map"
    none = road(lambda t: torch.softmax(model(t), 1), x[:1], maps[:1], torch.tensor([0]))
    assert math.isnan(none.road[0]) and none.reason == ["all-zero map"]


def test_deterministic_and_batch_independent():
    model = tiny_resnet()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 3, 32, 32, generator=g)
    maps = torch.rand(4, 5, 5, generator=g)
    t = torch.tensor([0, 1, 2, 3])
    seeds = torch.tensor([11, 12, 13, 14])
    pct = (20, 50, 80)

    def predict(z):
        return torch.softmax(model(z), 1)

    a = road(predict, x, maps, t, pct, seed=seeds, chunk=7)
    b = road(predict, x, maps, t, pct, seed=seeds, chunk=7)
    for k in ("morf", "lerf", "road", "road_random", "clean"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    perm = torch.tensor([2, 0, 3, 1])
    c = road(predict, x[perm], maps[perm], t[perm], pct, seed=seeds[perm], chunk=5)
    d = road(predict, x[3:], maps[3:], t[3:], pct, seed=seeds[3:], chunk=64)
    for k in ("morf", "lerf", "morf_random", "lerf_random", "road", "road_random"):
        assert torch.allclose(getattr(c, k), getattr(a, k)[perm], atol=1e-5), k
        assert torch.allclose(getattr(d, k), getattr(a, k)[3:], atol=1e-5), k
    e = road(predict, x, maps, t, pct, seed=0)                    # int seed = seed + position
    f = road(predict, x[2:], maps[2:], t[2:], pct, seed=2)
    assert torch.allclose(e.road[2:], f.road, atol=1e-5)


class RegionModel(torch.nn.Module):
    """Class 0's logit rises with the red channel's mean over a fixed region; nothing else matters."""

    def __init__(self, region):
        super().__init__()
        self.region = region

    def forward(self, x):
        m = x[:, 0][:, self.region].mean(1)
        return torch.stack([20 * (m - 0.5), torch.zeros_like(m)], 1)


def test_map_on_the_decisive_region_scores_higher():
    h = w = 32
    region = torch.zeros(h, w, dtype=torch.bool)
    region[10:22, 6:18] = True
    model = RegionModel(region)
    x = torch.full((2, 3, h, w), 0.2)
    x[:, :, region] = 0.9
    good = region.float().expand(2, h, w)
    res_good = road(lambda z: torch.softmax(model(z), 1), x, good, torch.tensor([0, 0]))
    res_bad = road(lambda z: torch.softmax(model(z), 1), x, 1 - good, torch.tensor([0, 0]))
    assert (res_good.clean > 0.99).all()
    assert (res_good.road > 0.3).all()
    assert (res_good.road > res_bad.road + 0.5).all()
    assert (res_good.road > res_good.road_random + 0.3).all()
    assert (res_good.morf[:, -1] < 0.01).all() and (res_good.lerf[:, 0] > 0.99).all()


def test_bad_percentiles_and_too_small_images():
    x = torch.rand(1, 3, 16, 16)
    maps = torch.rand(1, 4, 4)

    def predict(z):
        return torch.full((z.shape[0], 2), 0.5)

    for bad in ((0, 50), (50, 100), (150,), (-5, 10), ()):
        with pytest.raises(ConfigError, match="percentiles"):
            road(predict, x, maps, torch.tensor([0]), percentiles=bad)
    # 2x2 = 4 pixels: 10 % removes round(0.4) = 0 pixels, 90 % would remove all 4
    with pytest.raises(ConfigError, match="2x2 is too small"):
        road(predict, torch.rand(1, 3, 2, 2), maps, torch.tensor([0]))
    assert check_percentiles((10, 90), (3, 3)) == [1, 8]
    with pytest.raises(ConfigError, match="at least one known pixel"):
        impute(torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ConfigError, match="chunk"):
        road(predict, x, maps, torch.tensor([0]), chunk=0)


def test_ybroad():
    out = ybroad({"layer2": 0.1, "layer3": math.nan, "layer4": 0.3})
    assert out["ybroad_max"] == 0.3 and out["best_layer"] == "layer4"
    assert out["ybroad_mean"] == pytest.approx(0.2)
    assert [k for k, _ in out["curve"]] == ["layer2", "layer3", "layer4"]
    empty = ybroad([("a", math.nan)])
    assert math.isnan(empty["ybroad_max"]) and empty["best_layer"] is None
