"""Invalid-pixel metrics against a direct numpy computation (OpenCV's bilinear resize as reference)."""
import math

import cv2
import numpy as np
import pytest
import torch

from camgate.metrics.invalid import TIE_TOL, invalid_metrics


def numpy_metrics(cam: np.ndarray, mask: np.ndarray, topk: float = 0.1) -> dict:
    h, w = mask.shape
    heat = np.maximum(cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0).astype(np.float64)
    m = mask.astype(np.float64)
    total = heat.sum()
    if total == 0:
        return {"ratio": math.nan, "area": m.mean(), "peak": None, "topk": math.nan}
    k = math.ceil(topk * heat.size)
    kth = np.sort(heat.ravel())[::-1][k - 1]
    tol = TIE_TOL * heat.max()  # near-ties by float rounding are ties
    hot = heat >= kth - tol
    return {"ratio": (heat * m).sum() / total, "area": m.mean(),
            "peak": bool(mask.any() and heat[mask].max() >= heat.max() - tol),
            "topk": (hot & mask).sum() / hot.sum()}


def check(cams, masks, topk=0.1):
    got = invalid_metrics([torch.from_numpy(c) for c in cams], [torch.from_numpy(m) for m in masks], topk).rows()
    for c, mk, g in zip(cams, masks, got):
        ref = numpy_metrics(c, mk, topk)
        for key, name in (("ratio", "invalid_activation_ratio"), ("area", "invalid_area_ratio"),
                          ("topk", "topk_invalid_share")):
            if math.isnan(ref[key]):
                assert math.isnan(g[name])
            else:
                assert g[name] == pytest.approx(ref[key], abs=1e-5), name
        if ref["peak"] is not None:
            assert g["peak_in_invalid"] == ref["peak"]
        assert g["active"] == (not math.isnan(ref["ratio"]))
    return got


def test_random_maps_and_masks_of_mixed_sizes():
    rng = np.random.default_rng(0)
    cams = [np.maximum(rng.normal(size=(7, 7)), 0).astype(np.float32) for _ in range(6)]
    masks = [rng.random((224, 224)) < 0.3, rng.random((224, 224)) < 0.3, rng.random((90, 160)) < 0.5,
             rng.random((33, 17)) < 0.1, np.zeros((50, 50), bool), np.ones((50, 50), bool)]
    got = check(cams, masks)
    assert got[4]["invalid_activation_ratio"] == 0 and got[4]["peak_in_invalid"] is False
    assert got[5]["invalid_activation_ratio"] == pytest.approx(1) and got[5]["peak_in_invalid"] is True


def test_known_values():
    cam = np.zeros((4, 4), np.float32)
    cam[0, :] = 1.0  # all mass in the top row
    mask = np.zeros((4, 4), bool)
    mask[0, :] = True
    g = check([cam], [mask], topk=0.25)[0]
    assert g["invalid_activation_ratio"] == pytest.approx(1.0)
    assert g["invalid_area_ratio"] == pytest.approx(0.25)
    assert g["peak_in_invalid"] and g["topk_invalid_share"] == pytest.approx(1.0)


def test_all_zero_map_has_no_activation():
    g = check([np.zeros((7, 7), np.float32)], [np.ones((20, 20), bool)])[0]
    assert not g["active"] and math.isnan(g["invalid_activation_ratio"])


def test_ties_in_topk_do_not_depend_on_order():
    cam = np.ones((10, 10), np.float32)  # a flat map at mask size: every pixel is as hot as the k-th
    mask = np.zeros((10, 10), bool)
    mask[:3] = True
    g = check([cam], [mask], topk=0.1)[0]
    assert g["topk_invalid_share"] == pytest.approx(0.3)
    assert g["invalid_activation_ratio"] == pytest.approx(0.3)


def test_ties_do_not_depend_on_float_rounding():
    """The same map from batches of another size differs by float32 rounding (a few ulps): near-ties
    at the k-th value and at the peak must not flip the share or the peak."""
    cam = np.zeros((10, 10), np.float32)
    cam[0, :5] = 1.0    # 5 pixels at the peak, one of them invalid
    cam[1:3, :] = 0.5   # 20 pixels on a plateau at the k-th value (k = 10), half of them invalid
    mask = np.zeros((10, 10), bool)
    mask[0, 4] = True
    mask[1:3, :5] = True
    rng = np.random.default_rng(0)
    wobbly = (cam * (1 + rng.uniform(-2e-7, 2e-7, cam.shape))).astype(np.float32)  # a few float32 ulps
    exact, near = invalid_metrics([torch.from_numpy(cam), torch.from_numpy(wobbly)],
                                  [torch.from_numpy(mask)] * 2, topk=0.1).rows()
    assert exact["topk_invalid_share"] == pytest.approx(11 / 25)  # every plateau pixel is tied with the k-th
    assert abs(near["topk_invalid_share"] - exact["topk_invalid_share"]) <= 1e-6
    assert exact["peak_in_invalid"] and near["peak_in_invalid"]


def test_bad_topk():
    with pytest.raises(ValueError):
        invalid_metrics([torch.ones(2, 2)], [torch.ones(2, 2, dtype=torch.bool)], topk=0)
