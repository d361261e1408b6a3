"""Per-class maps of segmentation models and per-label maps of multi-label classifiers: the gradient
engines against pytorch-grad-cam (``SemanticSegmentationTarget``, ``ClassifierOutputTarget``),
localisation on a segmentation model whose evidence is known, empty regions and bad class ids, and
RISE / DE-CAM on the region and label scores (exact budgets, seeding).

Reference comparisons: camgate's raw map normalised as pytorch-grad-cam normalises (min-max, bilinear
upsampling to the input size with align_corners=False, min-max: ``camgate.cam.normalized``) against
pytorch-grad-cam's output for the same batch and targets, at the input resolution, within 1e-4.
"""
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, SemanticSegmentationTarget

from camgate.cam import normalized
from camgate.cam.blackbox import rise, rise_draws, rise_masks
from camgate.cam.segmentation import (NO_REGION, MultiLabelCamEngine, SegmentationCamEngine, classes_present,
                                      multilabel_blackbox, segmentation_blackbox)
from camgate.errors import ConfigError
from camgate.metrics.invalid import invalid_metrics, region_metrics
from camgate.model.backends import TorchBackend
from camgate.model.load import segmentation_output
from zoo import SEG_REGIONS, SEG_SIZE, region_segmenter, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
REFERENCE = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM}


def seg_model(arch):
    torch.manual_seed(0)
    m = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=4, aux_loss=False)
    return segmentation_output(m).eval().requires_grad_(False)


def reference(model, layer, method, x, targets):
    model.requires_grad_(True)  # as users run pytorch-grad-cam
    try:
        return REFERENCE[method](model=model, target_layers=[layer])(x, targets=targets)
    finally:
        model.requires_grad_(False)


def compare_per_rank(model, layer, method, x, res, target):
    """pytorch-grad-cam on the whole batch for each target rank (one target per image) vs camgate's maps."""
    worst = 0.0
    for k in range(max(len(r) for r in res)):
        have = [i for i, r in enumerate(res) if len(r) > k]
        ref = reference(model, layer, method, x[have], [target(res[i], k) for i in have])
        mine = np.stack([normalized(res[i].maps[k:k + 1], tuple(x.shape[-2:]))[0].numpy() for i in have])
        assert res[have[0]].maps[k].max() > 0, "degenerate all-zero map"
        worst = max(worst, float(np.abs(mine - ref).max()))
    return worst


@pytest.mark.parametrize("arch,size,layer,method", [
    ("fcn_resnet50", 64, "backbone.layer4", "gradcam"),
    ("fcn_resnet50", 64, "backbone.layer4", "gradcam++"),
    ("deeplabv3_mobilenet_v3_large", 96, "backbone.16", "gradcam"),
    ("deeplabv3_mobilenet_v3_large", 96, "backbone.16", "hirescam"),
])
def test_segmentation_maps_match_reference(arch, size, layer, method):
    model = seg_model(arch)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    engine = SegmentationCamEngine(model, [layer], method, num_classes=4)
    if arch.startswith("fcn"):
        res = engine(x)  # the predicted classes on their predicted regions (random weights: 3 of 4 present)
        assert all(len(r) >= 2 for r in res)
    else:
        # random MobileNet weights predict one class everywhere: explain all four on a given label map
        # (a ground truth: quadrants labelled 0..3), the same for both images
        gt = torch.zeros(size, size, dtype=torch.long)
        gt[:size // 2, size // 2:], gt[size // 2:, :size // 2], gt[size // 2:, size // 2:] = 1, 2, 3
        res = engine(x, regions=[gt, gt])
        assert [r.classes.tolist() for r in res] == [[0, 1, 2, 3]] * 2
    for r in res:
        assert r.status == ["ok"] * len(r) and r.regions.shape == (len(r), size, size)
        # the explained value is pytorch-grad-cam's target: the class's scores summed over its region
        assert torch.all(r.regions.flatten(1).sum(1) > 0)
    target = lambda r, k: SemanticSegmentationTarget(int(r.classes[k]), r.regions[k].float().numpy())  # noqa: E731
    delta = compare_per_rank(model, dict(model.named_modules())[layer], method, x, res, target)
    assert delta <= TOL, f"{arch}/{method}: max |delta| {delta:.2e}"


def test_multilabel_maps_match_reference():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    engine = MultiLabelCamEngine(model, ["layer4"], "gradcam", num_classes=5)
    res = engine(x, labels=[[0, 1, 2, 3, 4], [4, 2]])
    assert [r.classes.tolist() for r in res] == [[0, 1, 2, 3, 4], [4, 2]]
    logits = model(x)
    assert torch.allclose(res[0].targets, logits[0]) and torch.allclose(res[1].scores, logits[1, [4, 2]].sigmoid())
    target = lambda r, k: ClassifierOutputTarget(int(r.classes[k]))  # noqa: E731
    delta = compare_per_rank(model, model.layer4, "gradcam", x, res, target)
    assert delta <= TOL, f"max |delta| {delta:.2e}"
    # default: the labels whose sigmoid is >= 0.5; the same label's map whichever rank it has
    auto = engine(x)
    for i, r in enumerate(auto):
        assert r.classes.tolist() == (logits[i] >= 0).nonzero().flatten().tolist()
        for k, c in enumerate(r.classes.tolist()):
            j = res[0].classes.tolist().index(c) if i == 0 else None
            if j is not None:
                assert torch.allclose(r.maps[k], res[0].maps[j], rtol=1e-5, atol=1e-6)


def region_mask(k):
    m = torch.zeros(SEG_SIZE, dtype=torch.bool)
    x1, y1, x2, y2 = SEG_REGIONS[k]
    m[y1:y2, x1:x2] = True
    return m


def textures(n=2, seed=0):
    return torch.rand(n, 3, *SEG_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_maps_lie_on_the_region_the_class_reads(method):
    model = region_segmenter(4).eval().requires_grad_(False)
    res = SegmentationCamEngine(model, ["gate"], method)(textures())
    for r in res:
        assert r.classes.tolist() == [0, 1, 2]  # class 3 is never predicted
        for k in (1, 2):
            t = r.classes.tolist().index(k)
            assert torch.equal(r.regions[t], region_mask(k - 1))  # predicted exactly on its region
            inside = invalid_metrics([r.maps[t]], [region_mask(k - 1)]).invalid_activation_ratio.item()
            outside = invalid_metrics([r.maps[t]], [~region_mask(k - 1)]).invalid_activation_ratio.item()
            other = invalid_metrics([r.maps[t]], [region_mask(2 - k)]).invalid_activation_ratio.item()
            # all of the map rests on R_k, up to the bilinear upsampling's half-cell border
            assert inside > 0.9 and outside < 0.1 and other < 0.01, (k, inside, outside, other)
            m = region_metrics([r.maps[t]], [region_mask(k - 1)], [r.regions[t]])[0]
            assert m["outside_region_ratio"] == pytest.approx(outside, abs=1e-6)
            assert m["region_invalid_area"] == 1.0


def test_empty_region_is_a_status_and_bad_class_an_error():
    model = region_segmenter(4).eval().requires_grad_(False)
    engine = SegmentationCamEngine(model, ["gate"], "gradcam", num_classes=4)
    x = textures()
    res = engine(x, classes=[[1, 3], [3]])
    assert res[0].status == ["ok", NO_REGION] and res[1].status == [NO_REGION]
    assert res[0].reasons[1] == "class 3 has no pixel in the predicted region"
    assert res[0].maps[1].abs().max() == 0 and res[0].maps[0].max() > 0
    assert torch.isnan(res[1].scores).all() and res[1].targets.tolist() == [0.0]
    # a given region can be empty too: a ground truth without class 2
    gt = torch.zeros(SEG_SIZE, dtype=torch.long)
    r = engine(x[:1], classes=[[2]], regions=[gt])[0]
    assert r.status == [NO_REGION] and r.reasons == ["class 2 has no pixel in the given region"]
    # boolean regions given per class (e.g. ground-truth instances): class 1 explained on R_2 reads nothing there
    r = engine(x[:1], classes=[[1, 1]], regions=[[region_mask(0), region_mask(1)]])[0]
    assert r.status == ["ok", "ok"] and torch.equal(r.regions[1], region_mask(1)) and r.maps[1].abs().max() == 0
    assert torch.equal(r.maps[0], res[0].maps[0])  # on its own predicted region: the same map as before
    with pytest.raises(ConfigError, match=r"class 7 is outside the model's 4 classes \(0 to 3\)"):
        engine(x, classes=[[1, 7], None])
    with pytest.raises(ConfigError, match="class -1 is outside"):
        engine(x, classes=[[-1], None])
    with pytest.raises(ConfigError, match="1 class lists for 2 images"):
        engine(x, classes=[[1]])
    # classes to explain: present on at least N pixels, without ignored ones
    pred = model(x).argmax(1)
    assert classes_present(pred[0], 4) == [0, 1, 2]
    assert classes_present(pred[0], 4, min_pixels=24 * 32 + 1, ignore=[0]) == []
    assert engine(x, min_pixels=600, ignore=[0])[0].classes.tolist() == [1]  # R_1: 768 px, R_2: 576 px
    none = engine(x, ignore=[0, 1, 2])[0]
    assert len(none) == 0 and "no class with at least 1 pixel" in none.note


def test_wrong_output_is_refused_by_the_engines():
    flat = tiny_cnn(3).eval().requires_grad_(False)
    with pytest.raises(ConfigError, match=r"shape \(2, 3\).*segmentation model must output \(B, K, H, W\)"):
        SegmentationCamEngine(flat, ["features"])(torch.rand(2, 3, 32, 32))
    seg = region_segmenter(4).eval().requires_grad_(False)
    with pytest.raises(ConfigError, match=r"shape \(1, 4, 48, 64\).*multilabel model must output \(B, K\)"):
        MultiLabelCamEngine(seg, ["gate"])(textures(1))
    resnet = torchvision.models.resnet18(num_classes=5).eval().requires_grad_(False)
    with pytest.raises(ConfigError, match=r"label 5 is outside the model's 5 classes \(0 to 4\)"):
        MultiLabelCamEngine(resnet, ["layer4"], num_classes=5)(torch.rand(1, 3, 32, 32), labels=[[5]])
    with pytest.raises(ConfigError, match="K = num_classes = 5"):
        SegmentationCamEngine(seg, ["gate"], num_classes=5)(textures(1))


# --- black boxes -----------------------------------------------------------------------------------------

def seg_backend():
    return TorchBackend(region_segmenter(4), "cpu", num_classes=4, task="segmentation")


def test_rise_on_the_region_score_budget_and_seeds():
    b = seg_backend()
    x = textures(3, seed=4)
    budget = 40
    res = segmentation_blackbox(b, x, "rise", classes=[[1, 2, 3], [1], [2]], budget=budget, seeds=[5, 6, 7],
                                max_batch=16)
    assert b.calls == 3 + 3 * budget  # one clean pass per image, budget masked passes per image
    r = res[0]
    assert r.status == ["ok", "ok", NO_REGION] and r.maps.shape == (3, *SEG_SIZE)
    assert r.maps[2].abs().max() == 0 and (r.maps[:2] >= 0).all() and r.maps[0].max() > 0
    # the explained value: the class's mean probability over its region in the clean image
    p = b.model(x[:1]).softmax(1)[0]
    assert r.scores[0].item() == pytest.approx(p[1][region_mask(0)].mean().item(), rel=1e-5)
    # bit-identical re-run; the same maps whatever batch an image is in; the seed matters
    again = segmentation_blackbox(b, x, "rise", classes=[[1, 2, 3], [1], [2]], budget=budget, seeds=[5, 6, 7])
    assert all(torch.equal(u.maps, v.maps) for u, v in zip(res, again))
    alone = segmentation_blackbox(b, x[2:], "rise", classes=[[2]], budget=budget, seeds=[7])
    assert torch.equal(alone[0].maps, res[2].maps)
    other = segmentation_blackbox(b, x[2:], "rise", classes=[[2]], budget=budget, seeds=[8])
    assert not torch.equal(other[0].maps, res[2].maps)
    # RISE's sum over its masks of the region score, computed by hand: sum_i p_i M_i / (N p), with p_i
    # the mean probability of class 1 over its clean region in masked copy i (zero fill)
    draws = rise_draws([5], 1, budget, 7, 0.5, SEG_SIZE, "cpu")
    masks = rise_masks(draws, 0, 1, 0, budget, SEG_SIZE)
    with torch.no_grad():
        p = b.model(x[:1] * masks[:, None]).softmax(1)[:, 1][:, r.regions[0]].mean(1)
    assert torch.allclose(r.maps[0], (p[:, None, None] * masks).sum(0) / (budget * 0.5), rtol=1e-5, atol=1e-6)


def test_decam_on_the_region_score_budget():
    b = seg_backend()
    x = textures(2, seed=5)
    res = segmentation_blackbox(b, x, "decam", classes=[[1, 2], [3]], budget=20, seeds=[1, 2])
    assert b.calls == 2 + 2 * 20  # DE-CAM: budget per explained class; class 3 has no region: none spent
    assert res[0].maps.shape == (2, 7, 7) and res[1].status == [NO_REGION] and res[1].maps.abs().max() == 0
    with pytest.raises(ConfigError, match="class 4 is outside the model's 4 classes"):
        segmentation_blackbox(b, x, "rise", classes=[[4], None], budget=4)
    with pytest.raises(ConfigError, match="segmentation explanation needs a segmentation backend"):
        segmentation_blackbox(TorchBackend(tiny_cnn(3), "cpu"), torch.rand(1, 3, 32, 32), budget=4)


def test_rise_on_a_multilabel_label():
    b = TorchBackend(tiny_cnn(3), "cpu", task="multilabel")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    budget = 30
    res = multilabel_blackbox(b, x, "rise", labels=[[0, 2], [1]], budget=budget, seeds=[3, 4])
    assert b.calls == 2 + 2 * budget
    assert res[0].classes.tolist() == [0, 2] and res[0].maps.shape == (2, 32, 32)
    assert torch.allclose(res[0].scores, tiny_cnn(3)(x[:1])[0, [0, 2]].sigmoid())
    # several labels on the same masks = each label alone (the label's sigmoid probability)
    alone = rise(b, x[:1], torch.tensor([2]), budget=budget, seeds=[3])
    assert torch.allclose(res[0].maps[1], alone[0], rtol=1e-6, atol=1e-7)
    again = multilabel_blackbox(b, x, "rise", labels=[[0, 2], [1]], budget=budget, seeds=[3, 4])
    assert all(torch.equal(u.maps, v.maps) for u, v in zip(res, again))
    other = multilabel_blackbox(b, x, "rise", labels=[[0, 2], [1]], budget=budget, seeds=[3, 5])
    assert torch.equal(other[0].maps, res[0].maps) and not torch.equal(other[1].maps, res[1].maps)
    # default labels: sigmoid >= 0.5; none -> an empty row set with the reason
    calls = b.calls
    none = multilabel_blackbox(b, x[:1], "rise", threshold=0.999, budget=budget)
    assert len(none[0]) == 0 and "no label scores >= 0.999" in none[0].note and b.calls == calls + 1
    with pytest.raises(ConfigError, match="label 3 is outside the model's 3 classes"):
        multilabel_blackbox(b, x, "rise", labels=[[3], None], budget=4)
