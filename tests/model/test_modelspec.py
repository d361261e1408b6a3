import io

import numpy as np
import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from camgate.data.geometry import InputSpec
from camgate.errors import ModelCardError
from camgate.model.layers import default_target_layers
from camgate.model.load import load_model


def write_card(tmp_path, **kw):
    card = {"name": "m", "arch": "torchvision/resnet18", "num_classes": 3, "input": {"size": [64, 64]}}
    card.update(kw)
    p = tmp_path / "card.yaml"
    p.write_text(yaml.safe_dump(card))
    return str(p)


def test_safetensors_weights_relative_to_card(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    (tmp_path / "w").mkdir()
    save_file(net.state_dict(), str(tmp_path / "w" / "model.safetensors"))
    lm = load_model(write_card(tmp_path, weights="w/model.safetensors"), device="cpu")
    assert torch.equal(lm.model.fc.weight, net.fc.weight)
    assert lm.target_layers == ["layer4.1"] and len(lm.weights_sha256) == 64
    assert all(not p.requires_grad for p in lm.model.parameters()) and not lm.model.training


def test_state_dict_pt_loads_with_weights_only(tmp_path):
    net = torchvision.models.resnet18(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    lm = load_model(write_card(tmp_path, weights="w.pt"), device="cpu")
    assert torch.equal(lm.model.fc.bias, net.fc.bias)


class Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['CAMGATE_PWNED'], 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    monkeypatch.setenv("CAMGATE_PWNED", str(flag))
    buf = io.BytesIO()
    torch.save({"fc.weight": Boom()}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(ModelCardError, match="refused to unpickle"):
        load_model(write_card(tmp_path, weights="evil.pt"), device="cpu")
    assert not flag.exists()


def test_full_pickled_model_needs_explicit_permission(tmp_path):
    net = torchvision.models.resnet18(num_classes=3)
    torch.save(net, tmp_path / "full.pt")
    with pytest.raises(ModelCardError, match="allow_pickle"):
        load_model(write_card(tmp_path, weights="full.pt"), device="cpu")
    lm = load_model(write_card(tmp_path, weights="full.pt", allow_pickle=True), device="cpu")
    assert torch.equal(lm.model.fc.weight, net.fc.weight)


def test_wrong_target_layer_lists_candidates(tmp_path):
    with pytest.raises(ModelCardError, match=r"layer5.*candidates.*layer4"):
        load_model(write_card(tmp_path, target_layer="layer5"), device="cpu")


@pytest.mark.parametrize("bad, match", [
    ({"arch": "torchvision/nope"}, "unknown torchvision architecture"),
    ({"arch": "nomodule"}, "package.module:factory"),
    ({"arch": "no_such_pkg:f"}, "cannot import"),
    ({"classes": ["a"]}, "num_classes"),
    ({"colour": 1}, "unknown keys"),
    ({"input": {"size": [64, 64], "resize": "zoom"}}, "resize"),
    ({"weights": "missing.safetensors"}, "cannot read weights"),
])
def test_card_errors(tmp_path, bad, match):
    with pytest.raises(ModelCardError, match=match):
        load_model(write_card(tmp_path, **bad), device="cpu")


def test_weights_of_another_shape(tmp_path):
    save_file(torchvision.models.resnet18(num_classes=5).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelCardError, match="do not fit"):
        load_model(write_card(tmp_path, weights="w.safetensors"), device="cpu")


def test_module_factory_card(tmp_path):
    lm = load_model(write_card(tmp_path, arch="zoo:tiny_cnn"), device="cpu")
    assert lm.target_layers == ["features.2"]  # the last Conv2d


@pytest.mark.parametrize("arch, layer", [("resnet50", "layer4.2"), ("densenet121", "features"),
                                         ("mobilenet_v3_small", "features.12"), ("vgg11", "features.20"),
                                         ("convnext_tiny", "features.7"),
                                          ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1")])
def test_default_target_layers(arch, layer):
    m = torchvision.models.get_model(arch, weights=None, num_classes=3)
    assert default_target_layers(m, f"torchvision/{arch}") == [layer]


def test_center_crop_box_matches_torchvision_transform():
    from PIL import Image
    from torchvision import transforms as T

    spec = InputSpec(size=(224, 224), resize="center_crop", resize_to=256)
    yy, xx = np.mgrid[0:480, 0:640]
    img = Image.fromarray(np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1).astype(np.uint8))
    assert spec.box(640, 480) == (110, 30, 530, 450)  # 420x420 of the original ends up in the input
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(spec.mean, spec.std)])(img)
    # crop-then-resize vs resize-then-crop: same region, interpolation differs by a hair
    assert (spec.image_tensor(img) - ref).abs().mean() < 0.02
