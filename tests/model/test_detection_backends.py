"""Detector backends: one tiny detector as a torch module, a vendor function and three ONNX exports
(one image per run, torchvision's list-of-one-image input, a padded batch) giving the same
detections; every wrong output structure named, per call and at load; D-RISE through a backend with
an exact forward-pass budget and its map on the region the score reads."""
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from camgate.cam import drise, drise_detections
from camgate.model.backends import (BackendError, CallableDetectorBackend, DetectorBackend, DetectorOutputError,
                                    OnnxDetectorBackend, TorchDetectorBackend, load_detector_backend)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # legacy TorchScript exporter
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.usefixtures("one_thread")]  # many small ops: one torch thread

H = W = 32
K = 4
TL = (slice(0, H // 2), slice(0, W // 2))      # the region box 0's score reads
BR = (slice(H // 2, H), slice(W // 2, W))      # the region box 1's score reads


class Quadrants(nn.Module):
    """Two fixed boxes, the top-left quadrant (label 1) and the bottom-right one (label 2); each box's
    score is the mean brightness of its quadrant through a steep sigmoid (differentiable), its probs
    that score on its class and the rest on background 0."""

    num_classes = K

    def __init__(self, gain: float = 40.0, offset: float = 0.25):
        super().__init__()
        self.gain, self.offset = gain, offset
        self.register_buffer("boxes", torch.tensor([[0.0, 0.0, W / 2, H / 2], [W / 2, H / 2, W, H]]))
        self.register_buffer("labels", torch.tensor([1, 2]))

    def batch_scores(self, x):  # (B, 3, H, W) -> (B, 2)
        v = torch.stack([x[:, :, TL[0], TL[1]].mean((1, 2, 3)), x[:, :, BR[0], BR[1]].mean((1, 2, 3))], 1)
        return torch.sigmoid(self.gain * (v - self.offset))

    def probs(self, s):  # (.., 2) -> (.., 2, K)
        onehot = nn.functional.one_hot(self.labels, K).float()
        return s[..., None] * onehot + (1 - s[..., None]) * nn.functional.one_hot(torch.tensor(0), K).float()

    def forward(self, images):  # a list of (3, H, W) images (or a batch): torchvision's convention
        out = []
        for im in images:
            s = self.batch_scores(im[None])[0]
            out.append({"boxes": self.boxes.clone(), "labels": self.labels.clone(), "scores": s,
                        "probs": self.probs(s)})
        return out


class PaddedBatch(nn.Module):
    """The batched ONNX convention: (B, 3, H, W) in, (B, 3, 4), (B, 3), (B, 3), (B, 3, K) out, the
    third row of every image padding (score 0, label -1)."""

    def __init__(self, det: Quadrants):
        super().__init__()
        self.det = det

    def forward(self, x):
        b = x.shape[0]
        s = self.det.batch_scores(x)
        boxes = torch.cat([self.det.boxes, torch.zeros(1, 4)])[None].expand(b, 3, 4)
        labels = torch.cat([self.det.labels, torch.tensor([-1])])[None].expand(b, 3)
        scores = torch.cat([s, torch.zeros(b, 1)], 1)
        probs = torch.cat([self.det.probs(s), torch.zeros(b, 1, K)], 1)
        return boxes, labels, scores, probs


def textures(n, seed=0):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2


@pytest.fixture(scope="module")
def det():
    return Quadrants().eval()


@pytest.fixture(scope="module")
def exports(det, tmp_path_factory):
    """name -> .onnx path: 'batch1' (input (1, 3, H, W), named outputs with probs), 'image' (torchvision's
    export of a list of one (3, H, W) image, unnamed outputs: the first three taken), 'batched'."""
    d = tmp_path_factory.mktemp("det_onnx")
    x = torch.zeros(1, 3, H, W)
    names = ["boxes", "labels", "scores", "probs"]
    torch.onnx.export(det, (x,), str(d / "batch1.onnx"), dynamo=False, input_names=["x"], output_names=names)
    torch.onnx.export(det, ([x[0]],), str(d / "image.onnx"), dynamo=False)
    torch.onnx.export(PaddedBatch(det).eval(), (torch.zeros(2, 3, H, W),), str(d / "batched.onnx"), dynamo=False,
                      input_names=["x"], output_names=names,
                      dynamic_axes={"x": {0: "b"}, **{k: {0: "b"} for k in names}})
    return {k: str(d / f"{k}.onnx") for k in ("batch1", "image", "batched")}


def _numpy_fn(det):
    def fn(x):  # a numpy-only vendor function
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"
        with torch.no_grad():
            return [{k: v.numpy() for k, v in r.items()} for r in det(x)]
    return fn


def _same(a, b, probs=True):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb) if probs else set(ra) - {"probs"} == set(rb) - {"probs"}
        assert ra["boxes"].dtype == torch.float32 and ra["labels"].dtype == torch.int64
        assert ra["scores"].dtype == torch.float32 and ra["boxes"].device.type == "cpu"
        for k in ("boxes", "labels", "scores", "probs") if probs else ("boxes", "labels", "scores"):
            torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=1e-5)


def test_torch_callable_and_onnx_backends_agree(det, exports):
    x = textures(5)
    t = load_detector_backend("torch", model=det, num_classes=K, input_size=(H, W), batch_size=2)
    ref = t(x)
    assert isinstance(t, TorchDetectorBackend) and isinstance(t, DetectorBackend) and t.calls == 5
    assert [len(r["boxes"]) for r in ref] == [2] * 5 and (torch.stack([r["scores"] for r in ref]) > 0.5).all()
    c = CallableDetectorBackend(_numpy_fn(det), K, batch_size=3).validate((H, W))
    _same(c(x), ref)
    assert c.calls == 5 and c.num_classes == K and c.device == torch.device("cpu")
    for name, path in exports.items():
        o = load_detector_backend("onnx", weights=path, num_classes=K, input_size=(H, W), batch_size=4)
        assert isinstance(o, OnnxDetectorBackend) and o.calls == 0  # the dry call is not counted
        assert o.batched == (name == "batched") and o.single == (name == "image")
        _same(o(x), ref, probs=name != "image")  # unnamed outputs: boxes, labels, scores only
        assert o.calls == 5
    with open(exports["batch1"], "rb") as f:  # from bytes too
        _same(load_detector_backend("onnx", weights=f.read(), num_classes=K, input_size=(H, W))(x), ref)


def test_onnx_batched_drops_padding_rows_and_chunks(det, exports):
    o = OnnxDetectorBackend(exports["batched"], K, "cpu", input_size=(H, W), batch_size=4)
    seen = []
    run = o.session.run
    o.session = types.SimpleNamespace(run=lambda names, feed: seen.append(len(feed["x"])) or run(names, feed),
                                      get_inputs=o.session.get_inputs, get_outputs=o.session.get_outputs)
    out = o(textures(6))
    assert seen == [4, 2] and o.calls == 6 and all(len(r["scores"]) == 2 for r in out)
    assert all(r["labels"].tolist() == [1, 2] for r in out)


def test_onnx_load_errors(det, exports, tmp_path):
    with pytest.raises(BackendError, match=r"expects images \(3, 32, 32\), but the card's input is \(3, 48, 48\)"):
        load_detector_backend("onnx", weights=exports["batch1"], num_classes=K, input_size=(48, 48))
    cls = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, K)).eval()
    path = tmp_path / "classifier.onnx"
    torch.onnx.export(cls, (torch.zeros(1, 3, H, W),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    with pytest.raises(BackendError, match=r"has 1 output\(s\) \['y'\]: not a detector"):
        load_detector_backend("onnx", weights=str(path), num_classes=K, input_size=(H, W))
    with pytest.raises(BackendError, match="does not exist"):
        load_detector_backend("onnx", weights=str(tmp_path / "nope.onnx"), num_classes=K, input_size=(H, W))
    with pytest.raises(BackendError, match="label 2 outside the model's 2 classes"):
        load_detector_backend("onnx", weights=exports["batch1"], num_classes=2, input_size=(H, W))


def _good(n):
    return [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 5), "labels": torch.ones(5, dtype=torch.long),
             "scores": torch.full((5,), 0.5)} for _ in range(n)]


def _last(change):
    def breaks(n):
        out = _good(n)
        out[-1] = change(dict(out[-1]))
        return out
    return breaks


def _set(**kw):
    return _last(lambda r: {**r, **kw})


WRONG = {  # name: (output for n images, message for n images; {n} and {i} = n - 1 filled in)
    "count": (lambda n: _good(n)[:-1], r"the detector returned {m} results for {n} image"),
    "not a list": (lambda n: _good(1)[0], r"the detector returned a dict; expected a list of {n} results"),
    "not a mapping": (_last(lambda r: r["boxes"]), r"result {i} is a Tensor, not a mapping"),
    "missing key": (_last(lambda r: {k: v for k, v in r.items() if k != "scores"}), r"result {i} has no 'scores'"),
    "box shape": (_set(boxes=torch.zeros(5, 3)), r"result {i}: 'boxes' has shape \(5, 3\), expected \(M, 4\)"),
    "label shape": (_set(labels=torch.ones(5, 1, dtype=torch.long)),
                    r"result {i}: 'labels' has shape \(5, 1\), expected \(M,\)"),
    "lengths": (_set(scores=torch.ones(4)), r"result {i}: 5 boxes, 5 labels and 4 scores; expected one of each"),
    "non-finite": (_set(scores=torch.tensor([0.5, float("nan"), 0.5, 0.5, 0.5])),
                   r"result {i}: 'scores' has non-finite values"),
    "label range": (_set(labels=torch.tensor([1, 7, 1, 1, 1])), r"result {i}: label 7 outside the model's 4 classes"),
    "negative label": (_set(labels=-torch.ones(5, dtype=torch.long)),
                       r"result {i}: label -1 outside the model's 4 classes"),
    "fractional label": (_set(labels=torch.full((5,), 1.5)), r"result {i}: 'labels' are not whole numbers"),
    "probs shape": (_set(probs=torch.ones(5, 3)),
                    r"result {i}: 'probs' has shape \(5, 3\), expected \(M, K\) = \(5, 4\)"),
    "not numbers": (_set(scores=["a"] * 5), r"result {i}: 'scores' is not an array of numbers"),
}


@pytest.mark.parametrize("case", WRONG)
def test_wrong_structures_are_named_per_call_and_at_load(case, monkeypatch):
    make, msg = WRONG[case]
    b = CallableDetectorBackend(lambda x: make(len(x)), K)
    with pytest.raises(DetectorOutputError, match=msg.format(n=4, m=3, i=3)) as e:
        b(torch.zeros(4, 3, H, W))
    assert isinstance(e.value, ValueError)
    print(f"{case}: {e.value}")
    mod = types.ModuleType("vendor_detector_for_tests")
    mod.detect = lambda x: make(len(x))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    with pytest.raises(BackendError, match="callable model vendor_detector_for_tests:detect returns the wrong "
                                           "structure: " + msg.format(n=1, m=0, i=0)):
        load_detector_backend("callable", arch="vendor_detector_for_tests:detect", num_classes=K, input_size=(H, W))


def test_good_outputs_convert_and_empty_results_pass():
    out = CallableDetectorBackend(lambda x: [{"boxes": [], "labels": [], "scores": []},
                                             {"boxes": [[1, 2, 3, 4]], "labels": np.array([2.0]),
                                              "scores": np.array([0.5], np.float64), "extra": 1}], K)(
        torch.zeros(2, 3, H, W))
    assert out[0]["boxes"].shape == (0, 4) and out[0]["labels"].dtype == torch.int64
    assert out[1]["boxes"].dtype == torch.float32 and out[1]["labels"].tolist() == [2] and set(out[1]) == {
        "boxes", "labels", "scores"}


def test_load_errors_of_torch_and_callable(det, monkeypatch):
    with pytest.raises(BackendError, match="torch model Quadrants has 4 classes, but num_classes is 5"):
        load_detector_backend("torch", model=det, num_classes=5, input_size=(H, W))

    class Broken(nn.Module):
        def forward(self, images):
            return {"boxes": torch.zeros(0, 4)}

    with pytest.raises(BackendError, match="torch model Broken returns the wrong structure: the detector returned "
                                           "a dict"):
        load_detector_backend("torch", model=Broken(), num_classes=3, input_size=(H, W))
    with pytest.raises(BackendError, match=r"fails on a zero image of input size 32x32: ZeroDivisionError"):
        CallableDetectorBackend(lambda x: 1 / 0, K).validate((H, W))
    with pytest.raises(BackendError, match="cannot import kind .callable. arch"):
        load_detector_backend("callable", arch="no_such_module_here:f", num_classes=K, input_size=(H, W))
    with pytest.raises(BackendError, match="kind must be one of"):
        load_detector_backend("tflite", num_classes=K, input_size=(H, W))
    with pytest.raises(BackendError, match="kind 'torch' needs the model"):
        load_detector_backend("torch", num_classes=K, input_size=(H, W))


@pytest.mark.parametrize("kind", ["torch", "callable", "onnx"])
def test_drise_budget_is_exact_through_a_backend(kind, det, exports):
    b = {"torch": lambda: TorchDetectorBackend(det, "cpu", K, batch_size=7),
         "callable": lambda: CallableDetectorBackend(_numpy_fn(det), K, batch_size=7),
         "onnx": lambda: OnnxDetectorBackend(exports["batched"], K, "cpu", batch_size=7)}[kind]()
    x = textures(3)
    given = b(x[1:2])[0]
    b.calls = 0
    maps = drise(b, x, [None, given, None], budget=30, seeds=[0, 1, 2], grid=4, max_batch=16)
    assert b.calls == 3 * 30 + 2  # the budget per image + one clean pass per image without targets
    assert [m.shape for m in maps] == [(2, H, W)] * 3
    b.calls = 0
    res = drise_detections(b, x[:2], budget=10, seeds=[0, 1], grid=4)
    assert b.calls == 2 * 10 + 2 and [len(r) for r in res] == [2, 2]


def test_drise_map_lies_on_the_region_the_score_reads(exports):
    # Every mask keeps ~p of every pixel whatever the score, so a D-RISE map carries a uniform baseline
    # p * E[similarity] (plus sampling noise) and its raw mass in a quarter of the image stays near a
    # quarter; the mass above that baseline (above the map's median, an outside pixel's value as the
    # region covers a quarter) is where the evidence is, and so is the peak.
    b = load_detector_backend("onnx", weights=exports["batched"], num_classes=K, input_size=(H, W), batch_size=64)
    x = textures(2, seed=3)
    maps = drise(b, x, budget=500, seeds=[3, 4], grid=8)
    assert b.calls == 2 * 500 + 2
    for m in maps:
        for k, region in enumerate((TL, BR)):
            raw = m[k]
            inside = torch.zeros(H, W, dtype=torch.bool)
            inside[region] = True
            area = float(inside.float().mean())
            shares = {name: float(v[inside].sum() / v.sum()) for name, v in (
                ("above the median", (raw - raw.median()).clamp(min=0)),
                ("min-max normalised", (raw - raw.min()) / (raw.max() - raw.min())), ("raw", raw))}
            print(f"box {k}: share of map mass in the region its score reads (area share {area:.2f}): "
                  + ", ".join(f"{v:.3f} {name}" for name, v in shares.items()))
            assert shares["above the median"] > 3 * area and shares["min-max normalised"] > 1.6 * area
            assert shares["raw"] > area and inside.flatten()[raw.argmax()]
