"""Region metrics of segmentation maps on hand-made arrays: ``outside_region_ratio`` (share of the
map's mass outside the class's region) and ``region_invalid_area`` (share of the region's pixels that
are invalid), with maps and regions brought to the mask's resolution."""
import math

import pytest
import torch

from camgate.errors import ConfigError
from camgate.metrics.invalid import outside_region_ratio, region_invalid_area, region_metrics


def test_values_on_hand_made_arrays():
    cam = torch.zeros(4, 4)
    cam[0, 0], cam[3, 3] = 3.0, 1.0  # 3/4 of the mass top-left, 1/4 bottom-right
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True  # the top-left quarter
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, :] = True  # the top row: 2 of the region's 4 pixels
    assert outside_region_ratio(cam, region) == pytest.approx(0.25)
    assert region_invalid_area(region, mask) == 0.5
    assert region_metrics([cam], [mask], [region]) == [{"outside_region_ratio": pytest.approx(0.25),
                                                        "region_invalid_area": 0.5}]
    # negative values are no mass (the map is clamped at 0, as the other metrics do)
    neg = cam.clone()
    neg[3, 0] = -5.0
    assert outside_region_ratio(neg, region) == pytest.approx(0.25)


def test_resolutions_follow_the_mask():
    # a 2x2 map and a 2x2 region against an 8x8 mask: both brought to 8x8 (bilinear / nearest)
    cam = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    region = torch.tensor([[True, False], [False, False]])
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :4] = True
    m = region_metrics([cam], [mask], [region])[0]
    assert m["region_invalid_area"] == 1.0  # the region becomes the top-left 4x4 block, all invalid
    heat = torch.nn.functional.interpolate(cam[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert m["outside_region_ratio"] == pytest.approx(float(heat[~mask].sum() / heat.sum()))
    assert 0 < m["outside_region_ratio"] < 0.5  # bilinear spread past the block's border, most mass inside
    # a region finer than the mask: nearest neighbour down to it
    fine = torch.zeros(16, 16, dtype=torch.bool)
    fine[:8, :8] = True
    assert region_invalid_area(fine, mask) == 1.0


def test_no_activation_and_empty_region_are_nan():
    region = torch.ones(4, 4, dtype=torch.bool)
    assert math.isnan(outside_region_ratio(torch.zeros(2, 2), region))
    assert math.isnan(region_invalid_area(torch.zeros(4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)))
    m = region_metrics([torch.ones(2, 2)], [torch.zeros(4, 4, dtype=torch.bool)], [torch.zeros(4, 4, dtype=torch.bool)])
    assert m[0]["outside_region_ratio"] == 1.0 and math.isnan(m[0]["region_invalid_area"])
    with pytest.raises(ConfigError, match=r"a region must be \(H, W\), got shape \(1, 4, 4\)"):
        region_invalid_area(torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool))
