"""Black-box backends: ONNX export round trip, fixed batch dimensions, callable models, and the
configuration errors a model card can run into (all raised at load, by one dry call)."""
import sys
import types

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camgate.errors import ConfigError
from camgate.model.backends import Backend, CallableBackend, OnnxBackend, TorchBackend, load_backend

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # legacy TorchScript exporter
              pytest.mark.usefixtures("one_thread")]  # many small ops: one torch thread


def _export(model: nn.Module, path, size=(64, 64), batch: int | None = None) -> str:
    dyn = None if batch else {"x": {0: "b"}, "y": {0: "b"}}
    torch.onnx.export(model, torch.zeros(batch or 1, 3, *size), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes=dyn)
    return str(path)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


@pytest.fixture(scope="module")
def resnet_onnx(resnet, tmp_path_factory):
    return _export(resnet, tmp_path_factory.mktemp("onnx") / "r18.onnx")


def test_onnx_matches_torch(resnet, resnet_onnx):
    b = load_backend("onnx", weights=resnet_onnx, num_classes=5, input_size=(64, 64), device="cpu")
    assert isinstance(b, Backend) and b.kind == "onnx" and b.calls == 0  # the dry call is not counted
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = resnet(x).softmax(1)
    p = b.probs(x)
    assert p.shape == (6, 5) and p.device == b.device
    assert torch.allclose(p, ref, atol=1e-5), (p - ref).abs().max()
    assert b.calls == 6
    # from bytes too, and the torch backend agrees
    b2 = load_backend("onnx", weights=open(resnet_onnx, "rb").read(), num_classes=5, input_size=(64, 64))
    assert torch.allclose(b2.probs(x).cpu(), ref, atol=1e-5)
    t = TorchBackend(resnet, "cpu", batch_size=4)
    assert torch.allclose(t.probs(x), ref, atol=1e-6) and t.calls == 6 and t.num_classes == 5


@pytest.mark.parametrize("fixed", [1, 4])
def test_onnx_fixed_batch_dimension(fixed, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    b = OnnxBackend(_export(net.eval(), tmp_path / "fixed.onnx", (32, 32), batch=fixed), 3,
                    input_size=(32, 32))
    assert b.fixed_batch == fixed
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = net(x).softmax(1)
    assert torch.allclose(b.probs(x), ref, atol=1e-5)
    assert b.calls == 6  # padding rows of the last chunk are not counted


def test_onnx_not_a_classifier(tmp_path):
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).eval()
    path = _export(conv, tmp_path / "conv.onnx", (32, 32))
    with pytest.raises(ConfigError, match="not a classifier"):
        load_backend("onnx", weights=path, num_classes=5, input_size=(32, 32))


def test_onnx_wrong_input_size(resnet_onnx):
    with pytest.raises(ConfigError, match=r"expects input \(B, 3, 64, 64\).*\(B, 3, 32, 48\)"):
        load_backend("onnx", weights=resnet_onnx, num_classes=5, input_size=(32, 48))


def test_onnx_wrong_class_count(resnet_onnx):
    with pytest.raises(ConfigError, match="outputs 5 classes, but num_classes is 7"):
        load_backend("onnx", weights=resnet_onnx, num_classes=7, input_size=(64, 64))


def test_onnx_corrupt_or_missing_file(resnet_onnx, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(open(resnet_onnx, "rb").read()[:5000])  # truncated
    with pytest.raises(ConfigError, match="cannot load ONNX model .*bad.onnx: .+"):
        load_backend("onnx", weights=str(bad), num_classes=5, input_size=(64, 64))
    with pytest.raises(ConfigError, match="cannot load ONNX model <bytes>"):
        load_backend("onnx", weights=b"not an onnx graph", num_classes=5, input_size=(64, 64))
    with pytest.raises(ConfigError, match="does not exist"):
        load_backend("onnx", weights=str(tmp_path / "nope.onnx"), num_classes=5, input_size=(64, 64))


def _logits(x):
    return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3)), torch.zeros(x.shape[0])], 1)


def _probs_numpy(x):
    return torch.softmax(_logits(torch.as_tensor(np.asarray(x))), 1).numpy()  # a numpy-only vendor model


def test_callable_logits_and_probs():
    x = torch.randn(5, 3, 16, 16)
    ref = _logits(x).softmax(1)
    lg = CallableBackend(_logits, 3, output="logits", batch_size=2).validate((16, 16))
    pr = CallableBackend(_probs_numpy, 3, output="probs").validate((16, 16))
    assert torch.allclose(lg.probs(x), ref, atol=1e-6) and lg.calls == 5
    assert torch.allclose(pr.probs(x), ref, atol=1e-6) and pr.calls == 5
    # logits declared as probs are caught by the dry call
    with pytest.raises(ConfigError, match="output is 'probs'"):
        CallableBackend(lambda x: 3 * _logits(x) + 1, 3, output="probs").validate((16, 16))


def test_load_callable_from_module_path(monkeypatch):
    mod = types.ModuleType("vendor_model_for_tests")
    mod.score = _probs_numpy
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    b = load_backend("callable", arch="vendor_model_for_tests:score", num_classes=3, input_size=(8, 8),
                     output="probs")
    assert b.kind == "callable" and b.calls == 0
    with pytest.raises(ConfigError, match="cannot import kind .callable. arch"):
        load_backend("callable", arch="vendor_model_for_tests:nope", num_classes=3, input_size=(8, 8))
    with pytest.raises(ConfigError, match="outputs 3 scores, but num_classes is 4"):
        load_backend("callable", arch="vendor_model_for_tests:score", num_classes=4, input_size=(8, 8),
                     output="probs")
    with pytest.raises(ConfigError, match="fails on a zero batch .*ZeroDivisionError"):
        CallableBackend(lambda x: 1 / 0, 3).validate((8, 8))


def test_bad_kind_and_output():
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_backend("tflite", num_classes=3, input_size=(8, 8))
    with pytest.raises(ConfigError, match="output must be one of"):
        load_backend("callable", arch="x:y", num_classes=3, input_size=(8, 8), output="scores")
