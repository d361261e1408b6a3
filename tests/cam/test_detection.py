"""Per-detection maps for object detectors: the gradient engine (one forward per batch) against
pytorch-grad-cam's detection path, localisation on a detector whose evidence is known, and D-RISE.

Torchvision detectors are built with random weights (``weights=None, weights_backbone=None``) and
``min_size``/``max_size`` equal to the input's sides, so their transform neither upscales to 800 px
nor pads (sides are multiples of 32); thresholds at 0 and a small ``detections_per_img`` make them
detect a known number of boxes.
"""
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torchvision.models import detection as D

from camgate.cam import DetectionCamEngine, DetectionMaps, drise, drise_detections, fpn_reshape, normalized
from camgate.cam.detection import MethodError, box_score
from camgate.metrics.invalid import invalid_metrics
from zoo import RegionDetector

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


# --- a detector whose evidence is known ------------------------------------------------------------

H, W = 48, 64  # padded by the transform to 64 x 64: the map must be cut back to the image
REGIONS = [[0, 0, 32, 24], [40, 24, 64, 48]]


def region_masks(k):
    m = torch.zeros(H, W, dtype=torch.bool)
    x1, y1, x2, y2 = REGIONS[k]
    m[y1:y2, x1:x2] = True
    return m


def textures(n=2, seed=0):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def ratios(maps_per_image, k):
    """invalid_activation_ratio of detection k's maps with R_k invalid, and with the rest invalid."""
    cams = [d.maps[k] for d in maps_per_image] if isinstance(maps_per_image[0], DetectionMaps) else \
        [m[k] for m in maps_per_image]
    inside = invalid_metrics(cams, [region_masks(k)] * len(cams)).invalid_activation_ratio
    outside = invalid_metrics(cams, [~region_masks(k)] * len(cams)).invalid_activation_ratio
    return inside, outside


@pytest.mark.parametrize("method", ["hirescam", "layercam", "gradcamelementwise"])
def test_maps_lie_on_the_region_the_score_reads(method):
    # Spatially resolved methods (gradient x activation per pixel): the score's gradient is zero off
    # R_k, so each detection's map is too (up to the bilinear upsampling's half-cell border).
    # Grad-CAM weighs whole channels by their mean gradient and so shows those channels wherever
    # they fire: not local by construction, not tested here.
    model = RegionDetector((H, W), REGIONS).eval()
    res = DetectionCamEngine(model, [model.features], method)(textures())
    assert [r.maps.shape for r in res] == [(2, H // 4, W // 4)] * 2  # 16 x 16 canvas cut to 12 x 16
    for k in range(2):
        inside, outside = ratios(res, k)
        assert (inside > 0.9).all() and (outside < 0.1).all(), (k, inside, outside)


def test_detections_are_the_models_own_and_the_model_is_left_as_it_was():
    model = RegionDetector((H, W), REGIONS).train()
    model.mix.requires_grad_(False)  # one frozen parameter stays frozen, the others trainable
    x = textures()
    res = DetectionCamEngine(model, [model.features])(x)
    assert model.training and model.features[0].weight.requires_grad and not model.mix.requires_grad
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        own = model.eval()(list(x))
    for r, o in zip(res, own):
        assert torch.equal(r.boxes, o["boxes"]) and torch.equal(r.labels, o["labels"])
        torch.testing.assert_close(r.scores, o["scores"])
        torch.testing.assert_close(r.targets, o["scores"] + 1)  # IoU 1 with itself + score
        assert r.image_size == (H, W) and r.normalized().shape == (2, H, W)


def test_given_boxes_are_matched_and_lost_ones_get_no_map():
    model = RegionDetector((H, W), REGIONS).eval()
    x = textures(1)
    given = [{"boxes": torch.tensor([[1.0, 0.0, 32.0, 24.0], [40.0, 24.0, 64.0, 48.0], [0.0, 30.0, 10.0, 40.0]]),
              "labels": torch.tensor([0, 0, 1])}]  # a near box, a box with the wrong label, a box nowhere
    (r,) = DetectionCamEngine(model, [model.features], "hirescam")(x, given)
    with torch.no_grad():
        own = model(list(x))[0]["scores"]
    torch.testing.assert_close(r.targets, torch.stack([31 / 32 + own[0], torch.tensor(0.0), torch.tensor(0.0)]))
    assert r.maps[0].sum() > 0 and r.maps[1:].abs().sum() == 0
    assert r.scores[0] == own[0] and (r.scores[1:] == 0).all()


def test_a_batch_gives_each_image_the_maps_it_gets_alone():
    model = RegionDetector((H, W), REGIONS).eval()
    x = textures(3)
    together = DetectionCamEngine(model, [model.features])(x)
    per_detection = DetectionCamEngine(model, [model.features], batch_images=False)(x)
    for i in range(3):
        (alone,) = DetectionCamEngine(model, [model.features])(x[i:i + 1])
        torch.testing.assert_close(together[i].maps, alone.maps, rtol=1e-5, atol=1e-7)
        assert torch.equal(together[i].maps, per_detection[i].maps)


def test_ssdlite_default_layer_and_a_padded_input():
    # SSDlite never calls backbone.features itself (its blocks one by one): the default is its last block.
    torch.manual_seed(0)
    model = D.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3,
                                            score_thresh=0.0, detections_per_img=2).eval()
    res = DetectionCamEngine(model)(torch.rand(2, 3, 90, 120))
    assert [len(r) for r in res] == [2, 2] and all(r.normalized().shape == (2, 90, 120) for r in res)


def test_errors_name_the_problem():
    model = RegionDetector((H, W), REGIONS).eval()
    with pytest.raises(MethodError, match="native"):
        DetectionCamEngine(model, [model.features], "scorecam")
    with pytest.raises(MethodError, match="no default target layer"):
        DetectionCamEngine(model)


# --- torchvision detectors against pytorch-grad-cam -------------------------------------------------

def small(arch, **kw):
    torch.manual_seed(0)
    common = dict(weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=160)
    if arch.startswith("fasterrcnn"):
        m = getattr(D, arch)(**common, box_score_thresh=0.0, box_detections_per_img=3, rpn_pre_nms_top_n_test=100,
                             rpn_post_nms_top_n_test=100, **kw)
        with torch.no_grad():  # random heads saturate the softmax (all scores 1.0, gradients ~1e-7): soften
            m.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
    else:
        m = getattr(D, arch)(**common, score_thresh=0.0, detections_per_img=2, **kw)
    return m.eval()


def reference_maps(model, layer, x, res, reshape=None):
    """pytorch-grad-cam's detection path, one detection at a time, each image alone; each of its own
    detections (a forward of that image alone) matched to ours by box and label."""
    model.requires_grad_(True)  # as users run pytorch-grad-cam
    dev, n = 0.0, 0
    try:
        for i in range(x.shape[0]):
            with torch.no_grad():
                own = model(x[i:i + 1])[0]
            for b, lab in zip(own["boxes"], own["labels"]):
                iou = torchvision.ops.box_iou(b[None], res[i].boxes)[0]
                j = int(iou.argmax())
                assert iou[j] > 0.99 and res[i].labels[j] == lab
                ref = GradCAM(model, [layer], reshape)(x[i:i + 1], targets=[FasterRCNNBoxScoreTarget([lab], [b])])
                ours = normalized(res[i].maps[j:j + 1], tuple(x.shape[-2:])).numpy()
                dev, n = max(dev, float(np.abs(ref - ours).max())), n + 1
    finally:
        model.requires_grad_(False)
    return dev, n


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_fpn",
                                  pytest.param("fasterrcnn_resnet50_fpn", marks=pytest.mark.slow),
                                  "retinanet_resnet50_fpn"])
def test_maps_equal_pytorch_grad_cam_per_detection(arch):
    model = small(arch)
    layer = list(model.backbone.body.children())[-1]
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    model.requires_grad_(False)
    res = DetectionCamEngine(model)(x)  # the default layer: the body's last block
    assert all(len(r) >= 2 for r in res)
    dev, n = reference_maps(model, layer, x, res)
    assert n == sum(len(r) for r in res) and dev < TOL, dev


def test_fpn_dict_layer_with_reshape_equals_per_detection_backward():
    # pytorch-grad-cam records gradients of tensor outputs only (a dict has no register_hook): the
    # reference here is the plain per-detection computation, one forward + backward each.
    model = small("fasterrcnn_mobilenet_v3_large_fpn")
    x = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    reshape = fpn_reshape()
    model.requires_grad_(False)
    (r,) = DetectionCamEngine(model, [model.backbone], reshape_transform=reshape)(x)
    for j in range(len(r)):
        got = {}

        def hook(_m, _i, out, got=got):
            got.update({k: v.detach().requires_grad_(True) for k, v in out.items()})
            return type(out)(got)

        h = model.backbone.register_forward_hook(hook)
        try:
            t = box_score(model(list(x))[0], r.boxes[j], r.labels[j])
            gs = torch.autograd.grad(t.sum(), list(got.values()), allow_unused=True)  # 'pool' feeds the RPN only
            grads = {k: torch.zeros_like(v) if gk is None else gk for (k, v), gk in zip(got.items(), gs)}
        finally:
            h.remove()
        a, g = reshape({k: v.detach() for k, v in got.items()}), reshape(grads)
        ref = (g.mean((2, 3))[:, :, None, None] * a).sum(1).clamp(min=0)
        assert (normalized(ref, (128, 160)) - r.normalized()[j:j + 1]).abs().max() < TOL


# --- D-RISE ---------------------------------------------------------------------------------------

class Counting:
    def __init__(self, model):
        self.model, self.images, self.calls = model, 0, 0

    def __call__(self, xs):
        self.images += xs.shape[0]
        self.calls += 1
        return self.model(xs)


def steep():
    """The region detector with a steep score: a masked region moves it from ~0 to ~1."""
    model = RegionDetector((H, W), REGIONS).eval()
    with torch.no_grad():
        v = (model.features(model.transform(list(textures(8, seed=5)))[0].tensors) * model.mix[:, None, None]).sum(1)
    model.offset, model.gain = float(v.mean()) * 0.75, 20.0 / float(v.mean())
    return model


def test_drise_maps_lie_on_the_region_the_score_reads():
    # A D-RISE map is a Monte-Carlo estimate: each mask keeps ~p of every pixel whatever the score,
    # so every pixel carries a baseline p * E[similarity] plus sampling noise, and the share of the
    # map's mass in R stays far below 1 (RISE's likewise, see test_blackbox). Its hottest pixels and
    # its peak are where the evidence is: topk_invalid_share is ~1 with R invalid, ~0 with the rest.
    det = Counting(steep())
    x = textures(2)
    maps = drise(det, x, budget=500, seeds=[3, 4], grid=8)
    assert det.images == 2 * 500 + 2  # exact budget + one clean pass per image (targets not given)
    assert [m.shape for m in maps] == [(2, H, W)] * 2
    for k in range(2):
        cams = [m[k] for m in maps]
        inside = invalid_metrics(cams, [region_masks(k)] * 2)
        outside = invalid_metrics(cams, [~region_masks(k)] * 2)
        assert (inside.topk_invalid_share > 0.9).all() and (outside.topk_invalid_share < 0.1).all()
        assert inside.peak_in_invalid.all()
        shown = invalid_metrics([normalized(c[None], (H, W))[0] for c in cams], [region_masks(k)] * 2)
        assert (shown.invalid_activation_ratio > 1.5 * inside.invalid_area_ratio).all()


def test_drise_is_seeded_per_image_and_independent_of_the_batch():
    det = steep()
    x = textures(3)
    targets = [det(x[i:i + 1])[0] for i in range(3)]
    a = drise(det, x, targets, budget=40, seeds=[7, 8, 9], grid=6, max_batch=64)
    b = drise(det, x, targets, budget=40, seeds=[7, 8, 9], grid=6, max_batch=64)
    c = drise(det, x[1:2], targets[1:2], budget=40, seeds=[8], grid=6, max_batch=64)
    d = drise(det, x, targets, budget=40, seeds=[7, 8, 9], grid=6, max_batch=16)  # other chunks
    e = drise(det, x, targets, budget=40, seeds=[1, 8, 9], grid=6, max_batch=64)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    for other in (c[0], d[1]):  # the detector's conv on another batch size may round differently
        torch.testing.assert_close(a[1], other, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[0], e[0]) and torch.equal(a[1], e[1])


def test_drise_similarity_uses_iou_class_and_score():
    from camgate.cam.drise import similarity

    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    dets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1, 2]),
             "scores": torch.tensor([0.8, 0.9])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}]
    torch.testing.assert_close(similarity(target, dets), torch.tensor([[0.5 * 0.8, 0.0]]))
    probs = {**target, "probs": torch.tensor([[0.0, 1.0, 1.0]])}  # cosine with score vectors when all have them
    dets_p = [{**dets[0], "probs": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}]
    torch.testing.assert_close(similarity(probs, dets_p), torch.tensor([[0.9 * 2 ** -0.5]]))


def test_drise_detections_explain_every_clean_detection():
    det = steep()
    res = drise_detections(det, textures(1), budget=20, seeds=[0], grid=6)
    assert len(res) == 1 and len(res[0]) == 2 and res[0].maps.shape == (2, H, W)
    assert torch.equal(res[0].labels, torch.arange(2))
