"""Per-layer CAMs from one pass (camgate.cam.layers) against pytorch-grad-cam run layer by layer.

camgate's raw map of each layer, normalised the way pytorch-grad-cam does (``camgate.cam.normalized``),
must equal pytorch-grad-cam's output for that layer alone within 1e-4. The reference runs on a copy of
the model with in-place activations switched off (and a cloning transform for the stored activation):
with them on, pytorch-grad-cam's hooks on a BatchNorm followed by ``ReLU(inplace=True)`` see the
overwritten tensor. camgate runs on the original, in-place model.
"""
import copy

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import pytorch_grad_cam.eigen_cam as pgc_eigen
import pytorch_grad_cam.eigen_grad_cam as pgc_eigengrad
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
from torch import nn

from camgate.cam import normalized
from camgate.cam.layers import LayerPlan, LayerRef, layer_maps, normalise, plan_layers
from camgate.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one torch thread


TOL = 1e-4
SIZE = 64
REFERENCE = {
    "gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM, "gradcamelementwise": pgc.GradCAMElementWise,
}


@pytest.fixture(autouse=True)
def sign_corrected_svd(monkeypatch):
    monkeypatch.setattr(pgc_eigen, "get_2d_projection", get_2d_projection_with_sign_correction)
    monkeypatch.setattr(pgc_eigengrad, "get_2d_projection", get_2d_projection_with_sign_correction)


def build(arch):
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, num_classes=10).eval()


def batch(n=2, size=SIZE, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_model(model):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return ref.requires_grad_(True)  # as users run pytorch-grad-cam


def reference(ref, name, x, method="gradcam", target=None):
    layer = dict(ref.named_modules())[name]
    targets = None if target is None else [ClassifierOutputTarget(target)] * len(x)
    return REFERENCE[method](model=ref, target_layers=[layer], reshape_transform=lambda t: t.clone())(
        x, targets=targets)


def compare(model, x, plan, refs, method="gradcam", target=None):
    """Max |delta| per compared layer label between one-pass maps and the per-layer reference."""
    out = layer_maps(model, x, plan, method, targets=target)
    ref = reference_model(model)
    deltas = {}
    for r, m in zip(out.layers, out.maps):
        if r.label in refs:
            mine = normalized(m, tuple(x.shape[-2:])).numpy()
            deltas[r.label] = float(np.abs(mine - reference(ref, r.name, x, method, target)).max())
    assert set(deltas) == set(refs)
    return out, deltas


def once_called(plan):
    twice = {r.name for r in plan.layers if r.call > 0}
    return [r.label for r in plan.layers if r.name not in twice]


SAMPLES = {
    # every 2nd layer called once per forward; the rest below: BatchNorm layers feeding an in-place
    # ReLU, residual blocks (`result += input`), DenseNet concatenations, the last spatial layers
    "resnet18": (2, ["bn1", "layer1.0.bn1", "layer4.1.bn2", "layer4.1.conv2"]),
    "densenet121": (40, ["features.norm0", "features.denseblock1.denselayer1.norm1",
                         "features.denseblock1.denselayer1.norm2", "features.transition1.norm",
                         "features.denseblock1", "features.transition3.norm",
                         "features.denseblock4.denselayer1.norm1", "features.norm5"]),
    "mobilenet_v3_small": (12, ["features.0.1", "features.3", "features.12.1"]),
    "efficientnet_b0": (20, ["features.0.1", "features.2.1", "features.6.3", "features.8.1"]),
}


@pytest.mark.parametrize("arch", list(SAMPLES))
def test_one_pass_matches_reference_layer_by_layer(arch):
    model = build(arch)
    x = batch()
    plan = plan_layers(model, x[:1])
    step, extra = SAMPLES[arch]
    names = once_called(plan)
    assert set(extra) <= set(names)
    refs = set(names[::step]) | set(extra)
    out, deltas = compare(model, x, plan, refs)
    bad = {k: v for k, v in deltas.items() if v > TOL}
    assert not bad, f"{arch}: {bad}"
    # no layer silently lost: the gradient reached every one, and the BatchNorms before in-place
    # ReLUs compared above carry signal (a random network's deep Grad-CAM can be all negative for
    # an image, i.e. zero after the ReLU, in the reference as here)
    assert not out.unreached
    for name in extra:
        assert out.maps[plan.names().index(name)].amax() > 0, name


def test_every_method_and_a_fixed_target_match_reference():
    model = build("resnet18")
    x = batch()
    plan = plan_layers(model, x[:1], ["layer1.0.bn1", "layer2.0.downsample.1", "layer4.0.bn2"])
    for method in REFERENCE:
        target = 3 if method == "gradcam" else None
        refs = set(plan.names())
        if method == "eigengradcam":  # the reference's SVD of the 16x16 layer takes seconds
            refs.discard("layer1.0.bn1")
        out, deltas = compare(model, x, plan, refs, method, target)
        assert max(deltas.values()) <= TOL, f"{method}: {deltas}"
        if target is not None:
            assert out.targets.tolist() == [3, 3]


class TwoRelu(nn.Module):
    """conv-bn-relu, conv + skip, relu: with ``shared`` the same ReLU module runs twice."""

    def __init__(self, shared: bool):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        if not shared:
            self.relu_b = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.relu(self.bn(self.conv1(x)))
        h = getattr(self, "relu_b", self.relu)(self.conv2(h) + h)
        return self.fc(h.mean((2, 3)))


def test_module_called_twice_gives_one_frame_per_call():
    torch.manual_seed(0)
    shared = TwoRelu(shared=True).eval()
    twin = TwoRelu(shared=False).eval()
    twin.load_state_dict(shared.state_dict())
    x = batch(size=16)
    plan = plan_layers(shared, x[:1])
    assert plan.names() == ["conv1", "bn", "relu", "conv2", "relu#1"]
    assert [(r.name, r.call) for r in plan.layers][-1] == ("relu", 1)
    twin_plan = plan_layers(twin, x[:1])
    assert twin_plan.names() == ["conv1", "bn", "relu", "conv2", "relu_b"]
    for method in ("gradcam", "layercam", "eigencam"):
        mine = layer_maps(shared, x, plan, method).maps
        theirs = layer_maps(twin, x, twin_plan, method).maps
        for a, b in zip(mine, theirs):
            assert torch.allclose(a, b, atol=1e-6)
        ref = reference_model(twin)
        for label, twin_name in (("relu", "relu"), ("relu#1", "relu_b")):
            m = normalized(mine[plan.names().index(label)], (16, 16)).numpy()
            assert np.abs(m - reference(ref, twin_name, x, method)).max() <= TOL, (method, label)
    # selecting by plain name takes every call; name#k one call
    assert plan_layers(shared, x[:1], "relu").names() == ["relu", "relu#1"]
    assert plan_layers(shared, x[:1], "relu#1,conv1").names() == ["conv1", "relu#1"]


def test_resnet18_layer_policy():
    model = build("resnet18")
    plan = plan_layers(model, batch(1))
    skipped = dict(plan.skipped)
    # 58 frames: conv1, bn1, relu, maxpool + 8 BasicBlocks x (conv1, bn1, relu, conv2, bn2, relu#1)
    # + 3 downsample conv/bn pairs. Skipped (18): the root, 8 blocks, 4 stages and 3 downsample
    # Sequentials (their outputs are their last child's), avgpool (1x1) and fc (not a map).
    assert len(plan.layers) == 58 and len(plan.skipped) == 18
    assert [r.index for r in plan.layers] == list(range(58))
    assert "root" in skipped[""]
    for name, dup in (("layer1", "layer1.1.relu#1"), ("layer2.0", "layer2.0.relu#1"),
                      ("layer3.0.downsample", "layer3.0.downsample.1")):
        assert "duplicate" in skipped[name] and dup in skipped[name]
    assert "not a (B, C, h, w) map" in skipped["fc"] and "(1, 10)" in skipped["fc"]
    assert "1x1" in skipped["avgpool"]
    # BatchNorm before an in-place ReLU: both are frames, the ReLU is not mistaken for a duplicate
    assert {"bn1", "relu", "layer1.0.bn2", "layer1.0.relu#1"} <= set(plan.names())
    assert LayerRef("layer1.0.relu", 1, 9).label == "layer1.0.relu#1"
    # the same frames at 224 px
    assert plan_layers(model, batch(1, 224)).names() == plan.names()


def test_other_architectures_policy():
    eff = plan_layers(build("efficientnet_b0"), batch(1))
    skipped = dict(eff.skipped)
    assert "duplicate" in skipped["features.2.1.stochastic_depth"]  # eval-mode StochasticDepth
    assert "features.2.1" in eff.names()  # residual `result += input`: same storage, new values
    assert "duplicate" in skipped["features.1.0"]  # no residual: its output is its last child's
    assert "1x1" in skipped["features.1.0.block.1.avgpool"]  # squeeze-excitation
    assert "not a (B, C, h, w) map" in skipped["classifier"]
    dense = plan_layers(build("densenet121"), batch(1))
    assert "features.norm5" in skipped_of(dense, "features")
    assert "features.denseblock1" in dense.names()  # torch.cat of its layers: a map of its own


def skipped_of(plan, name):
    return dict(plan.skipped)[name]


def test_selection_errors():
    model = build("resnet18")
    with pytest.raises(ConfigError, match="unknown layer 'layer9'.*layer1.0.relu#1"):
        plan_layers(model, batch(1), ["layer4.1.conv2", "layer9"])
    with pytest.raises(ConfigError, match="'avgpool' has no frame of its own.*1x1 map"):
        plan_layers(model, batch(1), "avgpool")
    # a container whose output is a call's tensor is no error: it selects that frame
    assert plan_layers(model, batch(1), "layer4").names() == ["layer4.1.relu#1"]
    with pytest.raises(ConfigError, match="no layers selected"):
        plan_layers(model, batch(1), [])
    with pytest.raises(ConfigError, match="not a module"):
        layer_maps(model, batch(1), LayerPlan([LayerRef("nope", 0, 0)]))
    with pytest.raises(ConfigError, match="native method"):
        layer_maps(model, batch(1), plan_layers(model, batch(1), "layer4.1.conv2"), "scorecam")


class Aux(nn.Module):
    """An auxiliary branch whose output the logits never use."""

    def __init__(self):
        super().__init__()
        self.stem, self.aux, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 1)

    def forward(self, x):
        h = self.stem(x)
        self.aux(h)
        return self.head(h).mean((2, 3))


def test_one_forward_frozen_parameters_and_unreached_layers_reported():
    model = build("resnet18")
    model.requires_grad_(True)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    out = layer_maps(model, batch(), plan_layers(model, batch(1)))
    assert len(forwards) == 2  # the plan's dry run + one forward for all 58 layers
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(m.grad_fn is None and not m.requires_grad for m in out.maps)
    assert out.logits.shape == (2, 10) and out.targets.tolist() == out.logits.argmax(1).tolist()

    torch.manual_seed(0)
    aux = Aux().eval()
    plan = plan_layers(aux, batch(1, 16))
    assert plan.names() == ["stem", "aux", "head"]
    res = layer_maps(aux, batch(2, 16), plan)
    assert [r.label for r in res.unreached] == ["aux"]
    assert res.maps[1].shape == (2, 14, 14) and not res.maps[1].any()
    assert res.maps[0].any() and res.maps[2].any()


def test_global_and_layer_normalisation():
    strong = torch.rand(1, 8, 8) * 10
    weak = torch.rand(1, 4, 4) * 0.1
    g = normalise([strong, weak], "global")
    l_ = normalise([strong, weak], "layer")
    assert l_[1].max() > 0.99 and g[1].max() < 0.02  # the weak layer stays dark globally
    assert all(0 <= t.min() and t.max() <= 1 for t in g + l_)
    assert g[0].max() == 1.0  # the 99.5 % quantile is the top of the range
    # per image: a second image with 100x larger values gets the same view
    both = normalise([torch.cat([strong, strong * 100]), torch.cat([weak, weak * 100])], "global")
    assert torch.allclose(both[0][0], both[0][1]) and torch.allclose(both[1][0], both[1][1])
    with pytest.raises(ConfigError):
        normalise([strong], "minmax")
    # on a real network the two views differ
    model = build("resnet18")
    maps = layer_maps(model, batch(), plan_layers(model, batch(1))).maps
    g, l_ = normalise(maps, "global"), normalise(maps, "layer")
    assert max(float((a - b).abs().max()) for a, b in zip(g, l_)) > 0.5
    assert len({round(float(m.amax()), 3) for m in g}) > 5  # global peaks vary from layer to layer


class Sneaky(nn.Module):
    """Modifies conv1's output in place after use, but only when gradients are on: the dry forward
    (no grad) cannot see it."""

    def __init__(self, sneaky: bool):
        super().__init__()
        self.sneaky = sneaky
        self.stem, self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 6, 3)

    def forward(self, x):
        h = self.conv1(self.stem(x))
        out = self.conv2(h + 0)  # the add saves nothing for backward: h may change afterwards
        if self.sneaky and torch.is_grad_enabled():
            h.mul_(3.0)
        return out.mean((2, 3))


def test_outputs_handed_on_uncopied_only_when_nothing_modifies_them():
    plan = plan_layers(build("resnet18"), batch(1))
    # BatchNorm before an in-place ReLU, bn2 before `out += identity`: copied; the rest shared
    assert not {("bn1", 0), ("layer1.0.bn2", 0)} & plan.unmodified
    assert {("relu", 0), ("layer1.0.relu", 1), ("layer1.0.conv1", 0), ("layer2.0.downsample.1", 0)} <= plan.unmodified
    torch.manual_seed(0)
    sneaky, honest = Sneaky(True).eval(), Sneaky(False).eval()
    honest.load_state_dict(sneaky.state_dict())
    x = batch(2, 16)
    for select in ("all", "conv1"):  # conv1 on the graph already / conv1 the first, a leaf
        plan = plan_layers(sneaky, x[:1], select)
        assert ("conv1", 0) in plan.unmodified
        mine = layer_maps(sneaky, x, plan).maps
        theirs = layer_maps(honest, x, plan).maps
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mine, theirs)), select


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 1)
        self.fail = False

    def forward(self, x):
        h = self.head(self.stem(x))
        if self.fail:
            raise ValueError("broken forward")
        return h.mean((2, 3))


def test_trainable_model_same_maps_as_frozen_copy_and_flags_restored():
    model = build("resnet18")  # trainable, as constructed
    model.layer1.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    g = torch.full_like(model.fc.weight, 2.0)
    model.fc.weight.grad = g
    frozen = copy.deepcopy(model).requires_grad_(False)
    x, plan = batch(), plan_layers(model, batch(1), "conv1,bn1,layer1.0.conv1,layer3.1.conv2,layer4.1.conv2")
    mine, ref = layer_maps(model, x, plan), layer_maps(frozen, x, plan)
    assert torch.equal(mine.logits, ref.logits)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(mine.maps, ref.maps))
    assert all(m.amax((1, 2)).gt(0).all() for m in mine.maps)  # conv1, the first layer, included
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.fc.weight.grad is g and torch.equal(g, torch.full_like(g, 2.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")

    torch.manual_seed(0)
    bad = Fails().eval()
    bad.head.bias.requires_grad_(False)
    plan = plan_layers(bad, batch(1, 16))
    bad.fail = True
    flags = [p.requires_grad for p in bad.parameters()]
    with pytest.raises(ValueError, match="broken forward"):
        layer_maps(bad, batch(2, 16), plan)
    assert [p.requires_grad for p in bad.parameters()] == flags


@pytest.mark.parametrize("arch,name", [("resnet18", "layer3"), ("mobilenet_v3_small", "features.9")])
def test_a_frame_answers_to_every_module_whose_output_it_is(arch, name):
    """`--layers layer3` (the name given to --target-layer and to pytorch-grad-cam) selects the frame of
    that tensor, although an inner call produced it first."""
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=4).eval()
    plan = plan_layers(model, torch.zeros(1, 3, 64, 64), name)
    assert len(plan.layers) == 1
    ref = plan.layers[0]
    assert ref.label != name and name in ref.aliases and plan.aliases() == {ref.label: list(ref.aliases)}
    every = plan_layers(model, torch.zeros(1, 3, 64, 64))
    assert name not in every.names() and any(name in r.aliases for r in every.layers)
