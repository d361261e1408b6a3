"""Properties of the CAM engine beyond equality with the reference."""
import copy
import gc
import weakref

import pytest
import torch
import torchvision

from camgate.cam import CamEngine, MethodError, methods, normalized


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval().requires_grad_(False)


def test_no_parameter_gradients_and_no_graph_kept(model):
    engine = CamEngine(model, [model.layer4], "gradcam")
    x = torch.randn(2, 3, 96, 96)
    out = engine(x)
    assert all(p.grad is None for p in model.parameters())
    assert not out.cams.requires_grad and out.logits.grad_fn is None
    ref = weakref.ref(out.logits)
    del out
    gc.collect()
    assert ref() is None  # nothing (hooks, graph) keeps the batch's tensors alive


def test_backward_reaches_only_the_target_layer(model):
    # anything upstream of the target layer runs without recording a graph
    seen = []
    h = model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        CamEngine(model, [model.layer4], "gradcam")(torch.randn(1, 3, 64, 64))
    finally:
        h.remove()
    assert seen == [False]


def test_chained_target_layers_both_get_gradients(model):
    out = CamEngine(model, [model.layer3, model.layer4], "gradcam")(torch.randn(2, 3, 128, 128))
    single = CamEngine(model, [model.layer3], "gradcam")(torch.randn(2, 3, 128, 128))
    assert out.cams.shape[-2:] == single.cams.shape[-2:] == (8, 8)
    assert out.cams.amax((1, 2)).gt(0).all()


def test_targets_predicted_label_mix(model):
    x = torch.randn(3, 3, 64, 64)
    out = CamEngine(model, [model.layer4], "gradcam")(x, torch.tensor([-1, 2, 4]))
    assert out.targets[0] == out.logits[0].argmax() and out.targets[1:].tolist() == [2, 4]


def test_adapter_method_by_name():
    from zoo import tiny_cnn

    m = tiny_cnn(3).eval().requires_grad_(False)
    assert "scorecam" in methods() and "ablationcam" in methods()
    engine = CamEngine(m, [m.features[2]], "ScoreCAM")
    x = torch.randn(2, 3, 32, 32)
    out = engine(x)
    assert out.cams.shape == (2, 32, 32) and float(out.cams.max()) <= 1.0
    assert all(not p.requires_grad for p in m.parameters())  # the adapter leaves the model as it was
    import pytorch_grad_cam as pgc

    m.requires_grad_(True)
    ref = pgc.ScoreCAM(model=m, target_layers=[m.features[2]])(x, targets=None)
    assert abs(out.cams.numpy() - ref).max() < 1e-5


def test_unknown_method_lists_choices(model):
    with pytest.raises(MethodError, match="gradcam"):
        CamEngine(model, [model.layer4], "magiccam")


def test_inplace_relu_after_target_does_not_corrupt_map():
    torch.manual_seed(0)
    m = torchvision.models.vgg11(num_classes=4).eval().requires_grad_(False)
    conv = m.features[18]  # followed by ReLU(inplace=True)
    out = CamEngine(m, [conv], "gradcam")(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out.cams).all()
    assert normalized(out.cams, (64, 64)).max() <= 1


@pytest.mark.parametrize("arch, shape", [("swin_t", (7, 7)), ("vit_b_16", (14, 14))])
def test_token_models_get_their_reshape_from_the_card(tmp_path, arch, shape):
    import yaml

    from camgate.model.load import load_model

    card = tmp_path / "c.yaml"
    card.write_text(yaml.safe_dump({"name": arch, "arch": f"torchvision/{arch}", "num_classes": 3}))
    lm = load_model(str(card), device="cpu")
    torch.nn.init.normal_(lm.model.head.weight if arch == "swin_t" else lm.model.heads.head.weight, std=0.02)
    out = CamEngine(lm.model, lm.layers(), "gradcam", lm.reshape_transform)(torch.randn(1, 3, 224, 224))
    assert out.cams.shape == (1, *shape) and out.cams.max() > 0


def _net(inplace: tuple[bool, bool]) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights whatever the ReLUs do
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=inplace[0]), nn.Conv2d(8, 8, 3),
                         nn.ReLU(inplace=inplace[1]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval().requires_grad_(False)


@pytest.mark.parametrize("method, layers, inplace", [
    ("gradcam", [0], (True, False)),      # autograd refuses the in-place write into the leaf
    ("eigencam", [0], (True, False)),     # no grad mode: seen only by the activation's version
    ("gradcam", [0, 2], (False, True)),   # second layer's output is on the graph: version again
])
def test_inplace_op_after_target_falls_back_to_a_copy(method, layers, inplace):
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    plain, inpl = _net((False, False)), _net(inplace)
    ref_engine = CamEngine(plain, [plain[i] for i in layers], method)
    engine = CamEngine(inpl, [inpl[i] for i in layers], method)
    ref = ref_engine(x)
    for _ in range(2):  # the batch that detects it, and one after with the copy from the start
        out = engine(x)
        assert torch.equal(out.cams, ref.cams) and torch.equal(out.logits, ref.logits)
    assert out.cams.amax((1, 2)).gt(0).all()
    assert engine._clone and not ref_engine._clone


def test_no_copy_when_nothing_writes_in_place(model):
    engine = CamEngine(model, [model.layer3], "gradcam")
    engine(torch.randn(1, 3, 64, 64))
    assert not engine._clone


# --- a model as its user holds it: trainable parameters ------------------------------------------

def _trainable_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()  # requires_grad=True, as constructed


@pytest.mark.parametrize("layer", ["layer4", "conv1", "layer1", "bn1"])
def test_trainable_model_gives_the_frozen_models_maps(layer):
    m = _trainable_resnet18()
    frozen = copy.deepcopy(m).requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    out = CamEngine(m, [getattr(m, layer)], "gradcam")(x)
    ref = CamEngine(frozen, [getattr(frozen, layer)], "gradcam")(x)
    assert torch.allclose(out.cams, ref.cams, rtol=0, atol=1e-6)
    assert torch.equal(out.logits, ref.logits)
    assert out.cams.amax((1, 2)).gt(0).all()  # first-layer targets get their gradients too
    assert all(p.requires_grad and p.grad is None for p in m.parameters())


def test_trainable_model_records_no_graph_through_its_weights():
    # Fails with an engine that leaves the parameters trainable: the forward then records a graph
    # from conv1 on, and every weight is on it (an AccumulateGrad node for it under the logits).
    m = _trainable_resnet18()
    params = {id(p) for p in m.parameters()}
    upstream, on_graph = [], set()

    def walk(fn, seen):
        if fn is None or fn in seen:
            return
        seen.add(fn)
        if hasattr(fn, "variable"):
            on_graph.add(id(fn.variable))
        for nxt, _ in fn.next_functions:
            walk(nxt, seen)

    h1 = m.layer1.register_forward_hook(lambda mod, i, o: upstream.append(o.requires_grad))
    h2 = m.register_forward_hook(lambda mod, i, o: walk(o.grad_fn, set()))
    try:
        CamEngine(m, [m.layer4], "gradcam")(torch.randn(1, 3, 64, 64))
    finally:
        h1.remove()
        h2.remove()
    assert upstream == [False]
    assert on_graph and not (on_graph & params)  # only the layer4 leaf is on the graph


class _Raises(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        self.conv(x)
        raise ValueError("broken forward")


def test_flags_and_grads_come_back_exactly_also_when_the_forward_raises():
    m = _trainable_resnet18()
    m.conv1.requires_grad_(False)
    m.layer2[0].bn1.weight.requires_grad_(False)
    m.fc.bias.requires_grad_(False)
    before = [p.requires_grad for p in m.parameters()]
    assert any(before) and not all(before)
    g = torch.ones_like(m.fc.weight)
    m.fc.weight.grad = g  # a gradient the caller holds is left as it is
    CamEngine(m, [m.layer3], "gradcam")(torch.randn(2, 3, 64, 64))
    assert [p.requires_grad for p in m.parameters()] == before
    assert m.fc.weight.grad is g and torch.equal(g, torch.ones_like(g))
    assert all(p.grad is None for n, p in m.named_parameters() if n != "fc.weight")
    assert m.training is False

    bad = _Raises().train()
    bad.fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in bad.parameters()]
    with pytest.raises(ValueError, match="broken forward"):
        CamEngine(bad, [bad.conv], "gradcam")(torch.randn(1, 3, 8, 8))
    assert [p.requires_grad for p in bad.parameters()] == flags and bad.training


def test_adapter_keeps_the_callers_gradients_and_flags():
    """pytorch-grad-cam methods need parameter gradients; the caller's own ``.grad`` and flags come back."""
    from zoo import tiny_cnn

    m = tiny_cnn(3).eval()
    first = next(m.parameters())
    first.requires_grad_(False)
    flags = [p.requires_grad for p in m.parameters()]
    held = {p: torch.full_like(p, 0.5) for p in list(m.parameters())[1:3]}
    for p, g in held.items():
        p.grad = g
    engine = CamEngine(m, [m.features[2]], "fullgrad")
    engine(torch.randn(2, 3, 32, 32))
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(p.grad is held[p] and bool((p.grad == 0.5).all()) for p in held)
    assert all(p.grad is None for p in m.parameters() if p not in held)
