"""camgate's per-image metrics against Quantus's localisation metrics, on the same maps and masks.

Quantus gets exactly the map camgate scores: the raw map upsampled to the mask's size (bilinear,
``align_corners=False``) and clamped at 0, float32 values as float64, with the invalid mask as its
``s_batch`` and no model (``model=None``: the attributions are given). ``normalise=False`` and
``abs=False`` keep the map as it is (every metric compared here is unchanged by a positive scale, and the
maps are non-negative, so Quantus's defaults would give the same numbers).

Where the definitions differ (ties, empty masks, maps without activation) the test says so and asserts
the relation that holds instead; the README's "Metrics (per image)" section has the same table.
"""
import math
import warnings

import numpy as np
import pytest
import quantus
import torch
from helpers import make_set, tiny_card

from camgate.cam import upsample
from camgate.io import results as res
from camgate.metrics.invalid import METRIC_COLUMNS, TIE_TOL, invalid_metrics

OPTS = {"normalise": False, "abs": False, "disable_warnings": True}
TOL = 1e-6


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    with warnings.catch_warnings():  # Quantus warns about abs=False, empty masks; sklearn about one-class ROC
        warnings.simplefilter("ignore")
        yield


def q(metric, heat: np.ndarray, masks: np.ndarray, **kw) -> np.ndarray:
    """Quantus ``metric`` on maps (B, H, W) and masks (B, H, W) bool, without a model."""
    b, h, w = heat.shape
    # AttributionLocalisation keeps its default abs=True (it prints a note otherwise): the maps are >= 0
    opts = {**OPTS, "abs": metric == "AttributionLocalisation", **kw}
    scores = getattr(quantus, metric)(**opts)(
        model=None, x_batch=np.zeros((b, 1, h, w)), y_batch=np.zeros(b, int), a_batch=heat[:, None].astype(np.float64),
        s_batch=masks[:, None].astype(np.float64))
    return np.asarray(scores, dtype=np.float64)


def full_res(cam: np.ndarray, shape) -> np.ndarray:
    """The map camgate scores: upsampled to the mask's size, clamped at 0 (float32 values as float64)."""
    return upsample(torch.from_numpy(cam)[None].float(), tuple(shape))[0].clamp(min=0).numpy().astype(np.float64)


def cases():
    """Maps with ties (ReLU zeros, integer plateaus, the replicated borders of bilinear upsampling) and
    without, against masks of a few shapes, at three resolutions (one without upsampling)."""
    rng = np.random.default_rng(7)
    maps = {
        "relu": lambda: np.maximum(rng.normal(size=(7, 7)), 0),
        "levels": lambda: rng.integers(0, 4, (7, 7)).astype(float),
        "smooth": lambda: rng.random((7, 7)) + 0.1,
    }

    def masks(h, w):
        yy, xx = np.mgrid[:h, :w]
        one = np.zeros((h, w), bool)
        one[h // 2, w // 3] = True
        return {"random": rng.random((h, w)) < 0.3, "rows": yy < h // 4,
                "square": (abs(yy - h / 2) < h / 5) & (abs(xx - w / 2) < w / 5), "one": one, "all_but_one": ~one}

    out = []
    for shape in ((40, 40), (30, 50), (7, 7)):
        for mname, mask in masks(*shape).items():
            for cname, make in maps.items():
                out.append((f"{cname}/{mname}/{shape[0]}x{shape[1]}", make().astype(np.float32), mask))
    return out


CASES = cases()


@pytest.fixture(scope="module")
def scored():
    """camgate's rows and the full-resolution maps for every case (one call: mixed mask sizes)."""
    rows = invalid_metrics([torch.from_numpy(c) for _, c, _ in CASES], [torch.from_numpy(m) for *_, m in CASES]).rows()
    heats = [full_res(c, m.shape) for _, c, m in CASES]
    return rows, heats


def tie_group(a: np.ndarray, rank: int):
    """Pixels tied with the ``rank``-th hottest (within camgate's tolerance) and those hotter than it."""
    v = np.sort(a)[::-1][rank - 1]
    tol = TIE_TOL * a.max()
    return v, tol, np.abs(a - v) <= tol, a > v + tol


def quantus_rank_accuracy(heat: np.ndarray, mask: np.ndarray) -> tuple[float, bool]:
    """Quantus's RelevanceRankAccuracy of one map, and whether the pixels tied with the |M|-th value
    straddle the |M|-th place with valid and invalid ones among them. Then Quantus's value depends on
    the order ``np.argsort`` leaves them in, and this returns its mean over all orders: over the R
    cyclic orders of the tied pixels (each of them is among the chosen in equally many of those),
    each order made definite by spreading the tied values over [v, v + tol/2), still above every
    cooler pixel and below every hotter one."""
    a, s = heat.ravel(), mask.ravel()
    v, tol, tied, hotter = tie_group(a, int(s.sum()))
    idx = np.flatnonzero(tied)
    r = len(idx)
    if hotter.sum() + r == s.sum() or s[idx].all() or not s[idx].any():
        return float(q("RelevanceRankAccuracy", heat[None], mask[None])[0]), False
    copies = np.repeat(a[None], r, 0)
    copies[:, idx] = v + 0.5 * tol * ((np.arange(r)[None, :] + np.arange(r)[:, None]) % r) / r
    scores = q("RelevanceRankAccuracy", copies.reshape(r, *heat.shape), np.repeat(mask[None], r, 0))
    return float(scores.mean()), True


def test_relevance_rank_accuracy_is_quantus(scored):
    rows, heats = scored
    straddled, diffs = 0, []
    for (name, _, mask), row, heat in zip(CASES, rows, heats):
        ref, tie = quantus_rank_accuracy(heat, mask)
        straddled += tie
        diffs.append(abs(row["relevance_rank_accuracy"] - ref))
        assert diffs[-1] <= TOL, (name, row["relevance_rank_accuracy"], ref, tie)
    # both kinds are exercised: maps where Quantus's own order decides, and straddling ties
    assert 0 < straddled < len(CASES)
    print(f"relevance_rank_accuracy: max |camgate - Quantus| = {max(diffs):.2e} ({straddled} tie-averaged)")


def test_auc_is_quantus(scored):
    """Quantus's AUC (sklearn's roc_curve + auc: ties counted half) on the same values, per image."""
    rows, heats = scored
    diffs = []
    for (name, _, mask), row, heat in zip(CASES, rows, heats):
        ref = q("AUC", heat[None], mask[None])[0]
        diffs.append(abs(row["auc"] - ref))
        assert diffs[-1] <= TOL, (name, row["auc"], ref)
    print(f"auc: max |camgate - Quantus| = {max(diffs):.2e}")


def test_invalid_activation_ratio_is_relevance_mass_accuracy(scored):
    """Σ(H·M)/ΣH both; AttributionLocalisation (unweighted) is the same ratio with 1e-9 added to ΣH."""
    rows, heats = scored
    diffs = []
    for (name, _, mask), row, heat in zip(CASES, rows, heats):
        rma = q("RelevanceMassAccuracy", heat[None], mask[None])[0]
        loc = q("AttributionLocalisation", heat[None], mask[None])[0]
        diffs.append(max(abs(row["invalid_activation_ratio"] - rma), abs(rma - loc)))
        assert diffs[-1] <= TOL, (name, row["invalid_activation_ratio"], rma, loc)
    print(f"invalid_activation_ratio: max |camgate - Quantus| = {max(diffs):.2e}")


def test_invalid_area_ratio_is_attribution_localisation_ratio(scored):
    """AttributionLocalisation(weighted=True) multiplies its ratio by |M| / x_batch[2:].size: meant as
    the mask's share of the image, it counts the input from the third sample on (a Quantus slip), which
    is the image's size only for a batch of exactly 3 single-channel inputs. So: batches of 3 maps of
    one size, and weighted = ΣM/N · unweighted (compared as a product: the unweighted ratio is 0 where
    the map is cold on every invalid pixel)."""
    rows, heats = scored
    diffs = []
    for i in range(0, len(CASES), 3):
        sel = range(i, i + 3)
        assert len({CASES[j][2].shape for j in sel}) == 1
        heat, masks = np.stack([heats[j] for j in sel]), np.stack([CASES[j][2] for j in sel])
        weighted = q("AttributionLocalisation", heat, masks, weighted=True)
        plain = q("AttributionLocalisation", heat, masks)
        for j, wt, pl in zip(sel, weighted, plain):
            diffs.append(abs(rows[j]["invalid_area_ratio"] * pl - wt))
            assert diffs[-1] <= TOL, (CASES[j][0], rows[j]["invalid_area_ratio"], wt, pl)
        assert (plain > 0).any()
    print(f"invalid_area_ratio: max |camgate - Quantus| = {max(diffs):.2e}")


def test_peak_in_invalid_is_pointing_game(scored):
    """Quantus hits when an invalid pixel equals the maximum exactly; camgate also counts pixels within
    1e-6 of the peak (float rounding must not flip it): equal unless such a near-peak pixel is invalid
    while no exact one is (then camgate says True, Quantus False)."""
    rows, heats = scored
    for (name, _, mask), row, heat in zip(CASES, rows, heats):
        a, s = heat.ravel(), mask.ravel()
        peak = a.max()
        near = bool(s[a >= peak - TIE_TOL * peak].any())
        exact = bool(q("PointingGame", heat[None], mask[None])[0])
        assert row["peak_in_invalid"] == near, name
        assert exact == bool(s[a == peak].any()), name
        if near == bool(s[a == peak].any()):
            assert row["peak_in_invalid"] == exact, name


def test_topk_invalid_share_is_topk_intersection(scored):
    """Quantus's k is a pixel count, taken in the order ``np.argsort`` leaves ties in; camgate's k is
    ⌈topk·N⌉ with every pixel tied with the k-th (within 1e-6 of the peak) included. So camgate's share
    is exactly TopKIntersection with k = that number of pixels, and TopKIntersection with k = ⌈topk·N⌉
    wherever no tie reaches past the k-th place."""
    rows, heats = scored
    wider, diffs = 0, []
    for (name, _, mask), row, heat in zip(CASES, rows, heats):
        a = heat.ravel()
        k = math.ceil(0.1 * a.size)
        v, tol, tied, hotter = tie_group(a, k)
        k_hot = int((a >= v - tol).sum())
        ref = q("TopKIntersection", heat[None], mask[None], k=k_hot)[0]
        diffs.append(abs(row["topk_invalid_share"] - ref))
        assert diffs[-1] <= TOL, (name, row["topk_invalid_share"], ref, k, k_hot)
        if k_hot == k:
            assert q("TopKIntersection", heat[None], mask[None], k=k)[0] == pytest.approx(ref, abs=TOL)
        wider += k_hot > k
    assert 0 < wider < len(CASES)
    print(f"topk_invalid_share: max |camgate - Quantus(k = pixels at least as hot as the k-th)| = {max(diffs):.2e}")


def test_empty_and_full_masks_and_maps_without_activation():
    """NaN where there is nothing to rank; what Quantus returns there instead."""
    rng = np.random.default_rng(1)
    cam = (rng.random((7, 7)) + 0.1).astype(np.float32)
    empty, full = np.zeros((20, 20), bool), np.ones((20, 20), bool)
    some = rng.random((20, 20)) < 0.3
    zero = np.zeros((7, 7), np.float32)
    e, f, z = invalid_metrics([torch.from_numpy(c) for c in (cam, cam, zero)],
                              [torch.from_numpy(m) for m in (empty, full, some)]).rows()
    for row in (e, f, z):
        assert math.isnan(row["relevance_rank_accuracy"]) and math.isnan(row["auc"])
    heat = full_res(cam, (20, 20))
    # empty mask: Quantus NaN for both (and for RelevanceMassAccuracy, TopKIntersection), camgate 0 for
    # the ratio and the share, False for the peak, where Quantus's PointingGame says True (it writes NaN
    # into a bool array)
    assert np.isnan(q("RelevanceRankAccuracy", heat[None], empty[None])[0])
    assert np.isnan(q("AUC", heat[None], empty[None])[0])
    assert e["invalid_activation_ratio"] == 0 and e["topk_invalid_share"] == 0 and e["peak_in_invalid"] is False
    assert np.isnan(q("RelevanceMassAccuracy", heat[None], empty[None])[0])
    assert np.isnan(q("TopKIntersection", heat[None], empty[None], k=40)[0])
    assert bool(q("PointingGame", heat[None], empty[None])[0]) is True
    # full mask: Quantus's rank accuracy is 1 (every pixel is invalid), its AUC NaN (one class)
    assert q("RelevanceRankAccuracy", heat[None], full[None])[0] == 1.0
    assert np.isnan(q("AUC", heat[None], full[None])[0])
    # no activation (an all-zero map): Quantus refuses a batch of only such maps; next to another map its
    # AUC is 0.5 (all tied), its rank accuracy whatever order argsort leaves the zeros in, its mass
    # accuracy NaN and AttributionLocalisation 0 (its 1e-9)
    with pytest.raises(AssertionError, match="all equal to zero"):
        q("AUC", np.zeros((1, 20, 20)), some[None])
    pair, masks = np.stack([np.zeros((20, 20)), heat]), np.stack([some, some])
    assert q("AUC", pair, masks)[0] == 0.5
    assert np.isnan(q("RelevanceMassAccuracy", pair, masks)[0])
    assert q("AttributionLocalisation", pair, masks)[0] == 0.0
    assert not z["active"] and math.isnan(z["invalid_activation_ratio"])


def test_flat_and_known_maps():
    """A flat map ranks nothing: the rank accuracy is the invalid share (every pixel tied, pro rata),
    the AUC 0.5. A map hot exactly on the invalid pixels: 1 and 1; exactly off them: 0 and 0."""
    mask = np.zeros((10, 10), bool)
    mask[:3] = True
    flat, on, off = np.ones((10, 10), np.float32), mask.astype(np.float32), (~mask).astype(np.float32)
    got = invalid_metrics([torch.from_numpy(c) for c in (flat, on, off)], [torch.from_numpy(mask)] * 3).rows()
    assert got[0]["relevance_rank_accuracy"] == pytest.approx(0.3) and got[0]["auc"] == 0.5
    assert got[1]["relevance_rank_accuracy"] == 1 and got[1]["auc"] == 1
    assert got[2]["relevance_rank_accuracy"] == 0 and got[2]["auc"] == 0
    heat = np.stack([full_res(c, (10, 10)) for c in (flat, on, off)])
    # Quantus on the unambiguous maps; the flat map's rank accuracy depends on its argsort order
    assert list(q("AUC", heat, np.stack([mask] * 3))) == [0.5, 1.0, 0.0]
    assert list(q("RelevanceRankAccuracy", heat[1:], np.stack([mask] * 2))) == [1.0, 0.0]


def test_rank_accuracy_ties_do_not_depend_on_float_rounding():
    """A plateau at the |M|-th value: a few float32 ulps of wobble (another batch size) leave it."""
    cam = np.zeros((10, 10), np.float32)
    cam[0, :5] = 1.0   # 5 hottest pixels, 2 of them invalid
    cam[1:3, :] = 0.5  # 20 pixels on a plateau holding the |M|-th place, 8 of them invalid
    mask = np.zeros((10, 10), bool)
    mask[0, :2] = True
    mask[1:3, :4] = True  # |M| = 10: 5 slots left for the plateau
    rng = np.random.default_rng(0)
    wobbly = (cam * (1 + rng.uniform(-2e-7, 2e-7, cam.shape))).astype(np.float32)
    exact, near = invalid_metrics([torch.from_numpy(cam), torch.from_numpy(wobbly)],
                                  [torch.from_numpy(mask)] * 2).rows()
    assert exact["relevance_rank_accuracy"] == pytest.approx((2 + 5 * 8 / 20) / 10)
    assert abs(near["relevance_rank_accuracy"] - exact["relevance_rank_accuracy"]) <= 1e-6


def test_columns_in_a_run_results_file(tmp_path):
    """`camgate run` writes both columns, right after topk_invalid_share, defined for every ok row."""
    from camgate.runner.heatmaps import run

    _, manifest = make_set(tmp_path, n=3)
    out = str(tmp_path / "results.parquet")
    run(str(tiny_card(tmp_path / "model")), manifest, out, progress=False)
    table = res.read_table(out)
    names = table.column_names
    at = names.index("topk_invalid_share")
    assert names[at + 1:at + 3] == ["relevance_rank_accuracy", "auc"]
    assert set(METRIC_COLUMNS) <= set(names)
    df = table.to_pandas()
    ok = df[df.status == "ok"]
    assert len(ok) and ok.relevance_rank_accuracy.between(0, 1).all() and ok.auc.between(0, 1).all()
