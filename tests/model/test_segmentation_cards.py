"""Model cards with ``task: segmentation`` and ``task: multilabel``: torchvision's segmentation models
built offline from the card, default target layers, outputs checked at load (torch factories and
black-box backends alike), and architectures under the wrong task refused naming the task to set."""
import copy

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from camgate.errors import ConfigError, ModelCardError
from camgate.model.backends import load_backend
from camgate.model.card import ModelCard
from camgate.model.load import SegmentationOutput, load_model
from zoo import SEG_SIZE, region_segmenter

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # legacy TorchScript exporter
              pytest.mark.usefixtures("one_thread")]


def card(**kw) -> ModelCard:
    d = {"name": "seg", "num_classes": 4, "task": "segmentation", "input": {"size": list(SEG_SIZE)}}
    d.update(kw)
    return ModelCard.from_dict(d)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to fetch weights fails the test: cards build with weights=None, weights_backbone=None."""
    def refuse(*a, **k):
        raise AssertionError(f"tried to download {a[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("arch,layer", [
    ("fcn_resnet50", "backbone.layer4"),
    pytest.param("fcn_resnet101", "backbone.layer4", marks=pytest.mark.slow),
    ("deeplabv3_resnet50", "backbone.layer4"),
    pytest.param("deeplabv3_resnet101", "backbone.layer4", marks=pytest.mark.slow),
    ("deeplabv3_mobilenet_v3_large", "backbone.16"),
    ("lraspp_mobilenet_v3_large", "backbone.16"),
])
def test_torchvision_segmentation_models_build_offline(offline, arch, layer):
    lm = load_model(card(arch=f"torchvision/{arch}", input={"size": [64, 64]}), device="cpu")
    assert isinstance(lm.model, SegmentationOutput) and lm.target_layers == [layer]
    with torch.no_grad():
        out = lm.model(torch.zeros(2, 3, 64, 64))
    assert torch.is_tensor(out) and out.shape == (2, 4, 64, 64)  # the dict's 'out' only, no aux head
    assert not any(k.startswith("aux_classifier") for k in lm.model.state_dict())
    assert lm.metadata()["task"] == "segmentation" and lm.card.to_dict()["task"] == "segmentation"


def test_segmentation_weights_load_with_torchvision_keys(offline, tmp_path):
    """The wrapper keeps torchvision's module names: its state_dict files load as they are."""
    torch.manual_seed(1)
    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=4)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    lm = load_model(card(arch="torchvision/lraspp_mobilenet_v3_large", weights=str(tmp_path / "w.safetensors"),
                         input={"size": [64, 64]}), device="cpu")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lm.model(x), net.eval()(x)["out"])
    assert set(lm.model.state_dict()) == set(net.state_dict())
    twin = copy.deepcopy(lm.model)  # as the randomisation sanity check copies models
    with torch.no_grad():
        assert isinstance(twin, SegmentationOutput) and torch.equal(twin(x), lm.model(x))


@pytest.mark.parametrize("arch,task,fix", [
    ("torchvision/fcn_resnet50", "classification", "needs task: segmentation"),
    ("torchvision/lraspp_mobilenet_v3_large", "multilabel", "needs task: segmentation"),
    ("torchvision/deeplabv3_resnet50", "detection", "needs task: segmentation"),
    ("torchvision/resnet18", "segmentation", "is a classifier, not a segmentation model: the model card needs "
                                             "task: classification or multilabel"),
    ("torchvision/fcos_resnet50_fpn", "segmentation", "is a detector, not a segmentation model: .* task: detection"),
])
def test_wrong_task_is_refused_naming_the_task(offline, arch, task, fix):
    with pytest.raises(ModelCardError, match=fix):
        load_model(card(arch=arch, task=task), device="cpu")


def test_factory_outputs_are_checked_at_load():
    lm = load_model(card(arch="zoo:region_segmenter"), device="cpu")
    assert lm.target_layers == ["features.0"]  # no backbone: the last conv
    lm = load_model(card(arch="zoo:dict_segmenter", target_layer="gate"), device="cpu")
    assert isinstance(lm.model, SegmentationOutput) and lm.model(torch.zeros(1, 3, *SEG_SIZE)).shape == (1, 4, 48, 64)
    with pytest.raises(ModelCardError, match=r"model card seg: the model outputs shape \(1, 3, 48, 64\) but a "
                                             r"segmentation model must output \(B, K, H, W\) with K = num_classes = 4"):
        load_model(card(arch="zoo:fixed_segmenter"), device="cpu")
    with pytest.raises(ModelCardError, match=r"outputs shape \(1, 4\) .*\(B, K, H, W\).*set task classification or "
                                             r"multilabel"):
        load_model(card(arch="zoo:flat_segmenter", input={"size": [32, 32]}), device="cpu")
    with pytest.raises(ModelCardError, match=r"outputs shape \(1, 4, 48, 64\) but a multilabel model must output "
                                             r"\(B, K\).*per-pixel scores: set task segmentation"):
        load_model(card(arch="zoo:region_segmenter", task="multilabel", target_layer="gate"), device="cpu")


def test_multilabel_card_loads_a_classifier():
    lm = load_model(card(arch="torchvision/resnet18", task="multilabel", num_classes=5, input={"size": [64, 64]}),
                    device="cpu")
    assert lm.target_layers == ["layer4.1"] and lm.metadata()["task"] == "multilabel"
    from camgate.model.backends import TorchBackend

    b = TorchBackend.from_loaded(lm)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert b.task == "multilabel" and torch.allclose(b.probs(x), lm.model(x).sigmoid())  # sigmoid, not softmax


def test_black_box_segmentation_backends(tmp_path):
    # a vendor function returning (B, K, H, W) logits: softmax over K per pixel
    lm = load_model(card(kind="callable", arch="zoo:segmenter_scores"), device="cpu")
    x = torch.rand(3, 3, *SEG_SIZE)
    p = lm.backend.probs(x)
    assert lm.backend.task == "segmentation" and p.shape == (3, 4, *SEG_SIZE) and lm.backend.calls == 3
    assert torch.allclose(p.sum(1), torch.ones(3, *SEG_SIZE), atol=1e-5)
    with pytest.raises(ModelCardError, match=r"outputs 4 scores, but num_classes is 5 \(output shape "
                                             r"\(1, 4, 48, 64\), expected \(B, K, H, W\)\)"):
        load_model(card(kind="callable", arch="zoo:segmenter_scores", num_classes=5), device="cpu")
    with pytest.raises(ModelCardError, match=r"returned shape \(1, 3\) for 1 images: not a segmentation model "
                                             r"\(expected \(B, K, H, W\)\)"):
        load_model(card(kind="callable", arch="zoo:tiny_probs", num_classes=3, input={"size": [32, 32]}),
                   device="cpu")
    with pytest.raises(ModelCardError, match=r"returned shape \(1, 4, 48, 64\) for 1 images: not a multilabel "
                                             r"model \(expected \(B, K\)\)"):
        load_model(card(kind="callable", arch="zoo:segmenter_scores", task="multilabel"), device="cpu")
    # probabilities declared as such must sum to 1 per pixel
    with pytest.raises(ConfigError, match="output is 'probs' but"):
        load_backend("callable", arch="zoo:segmenter_scores", num_classes=4, input_size=SEG_SIZE, output="probs",
                     task="segmentation")
    # ONNX: the same model exported; a rank-4 output where a classifier is expected is named
    path = tmp_path / "seg.onnx"
    torch.onnx.export(region_segmenter(4).eval(), torch.zeros(1, 3, *SEG_SIZE), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    ob = load_backend("onnx", weights=str(path), num_classes=4, input_size=SEG_SIZE, device="cpu",
                      task="segmentation")
    assert torch.allclose(ob.probs(x), p, atol=1e-5)
    with pytest.raises(ConfigError, match=r"not a classifier: output 'y' has shape .* \(rank 4\), expected \(B, K\)"):
        load_backend("onnx", weights=str(path), num_classes=4, input_size=SEG_SIZE, device="cpu")
    with pytest.raises(ConfigError, match="task must be one of"):
        load_backend("onnx", weights=str(path), num_classes=4, input_size=SEG_SIZE, task="detection")


def test_card_task_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"name": "m", "arch": "torchvision/resnet18", "num_classes": 3, "task": "multilabel"}))
    c = ModelCard.load(str(p))
    assert c.multilabel and not c.segmentation and c.to_dict()["task"] == "multilabel"
    assert "task" not in ModelCard.from_dict({"name": "m", "arch": "a:b", "num_classes": 3}).to_dict()
    with pytest.raises(ModelCardError, match="task must be one of .*'segmentation', 'multilabel'"):
        ModelCard.from_dict({"name": "m", "arch": "a:b", "num_classes": 3, "task": "panoptic"})
