"""Run a classifier as a black box: normalised images in, class probabilities out.

The same backends run multi-label classifiers (``task='multilabel'``: (B, K) sigmoid probabilities)
and semantic segmentation models (``task='segmentation'``: (B, K, H, W), softmax over K per pixel);
:func:`check_scores` is the one check of such raw outputs, at load and on every call.

Black-box saliency (:mod:`camgate.cam.blackbox`) needs nothing from a model but ``probs(x)``, so
models without gradients fit too: exported ONNX graphs and vendor models behind a Python function.

Every backend
  * takes ``x``: (B, 3, H, W) float, the already normalised model input (as ``InputSpec`` makes it);
  * returns (B, K) probabilities on ``backend.device`` (softmax applied when the model gives logits);
  * counts the images it evaluated in ``backend.calls`` (padding rows excluded), so callers and
    tests can check forward-pass budgets exactly;
  * splits large inputs into chunks of ``batch_size`` images (the black-box methods send whole
    populations of masked images at once).

:func:`load_backend` is the one entry point for model cards (``kind: onnx`` / ``kind: callable``):
it builds the backend and validates it with one dry call on a zero batch, so a wrong file, input
size or output shape fails with a :class:`ConfigError` before any data is read.

Object detectors have their own backends (:class:`DetectorBackend`: ``backend(x)`` -> per image
``boxes``, ``labels``, ``scores``, the callable D-RISE takes), every output checked by
:func:`check_detections`; :func:`load_detector_backend` is their entry point, with the same dry call.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CamgateError, ConfigError

OUTPUTS = ("logits", "probs")
KINDS = ("torch", "onnx", "callable")
SCORE_TASKS = {"classification": "(B, K)", "multilabel": "(B, K)", "segmentation": "(B, K, H, W)"}


class BackendError(ConfigError):
    """The model behind a backend is unusable (file, shapes, outputs); raised at load."""


@runtime_checkable
class Backend(Protocol):
    kind: str  # 'torch' | 'onnx' | 'callable'
    num_classes: int
    device: torch.device
    calls: int  # images evaluated so far

    def probs(self, x: Tensor) -> Tensor: ...


def _to_probs(scores: Tensor, output: str, task: str = "classification") -> Tensor:
    scores = scores.float()
    if output == "probs":
        return scores
    return scores.sigmoid() if task == "multilabel" else scores.softmax(1)  # segmentation: over K per pixel


def _check_task(task: str) -> None:
    if task not in SCORE_TASKS:
        raise BackendError(f"task must be one of {list(SCORE_TASKS)} for a scoring backend, got {task!r}")


def output_scores(out):
    """A model's raw output -> its scores: torchvision's segmentation models return a dict whose
    ``out`` holds them; anything else is returned as it is."""
    return out["out"] if isinstance(out, Mapping) and "out" in out else out


def check_scores(out, task: str, num_classes: int, who: str = "the model", n: int | None = None,
                 error: type[ConfigError] | None = None) -> Tensor:
    """A classifier's, multi-label classifier's or segmentation model's output for ``n`` images ->
    the same tensor, checked: rank 2, (B, K), or for segmentation rank 4, (B, K, H, W), with
    K = ``num_classes`` (and B = ``n`` when given). ``error`` (a ConfigError type, default
    :class:`BackendError`) names ``who``, the shape found and the shape expected."""
    _check_task(task)
    error = error or BackendError
    want = SCORE_TASKS[task]
    if not torch.is_tensor(out):
        raise error(f"{who} returns a {type(out).__name__}, expected a tensor {want} of {task} scores")
    rank = 4 if task == "segmentation" else 2
    k_ok = out.ndim > 1 and out.shape[1] == num_classes
    if out.ndim != rank or not k_ok or (n is not None and out.shape[0] != n):
        got = f"for {n} image{'s' * (n != 1)} " if n is not None else ""
        hint = ""
        if out.ndim == 2 and task == "segmentation":
            hint = " (a classifier's output: set task classification or multilabel)"
        elif out.ndim == 4 and rank == 2:
            hint = " (per-pixel scores: set task segmentation)"
        raise error(f"{who} outputs shape {tuple(out.shape)} {got}but a {task} model must output {want} "
                    f"with K = num_classes = {num_classes}{hint}")
    return out


class _Base:
    """Chunking, counting and the load-time check shared by the backends."""

    kind = "?"
    output = "logits"
    batch_size = 64

    def __init__(self, num_classes: int, device: torch.device, output: str, batch_size: int | None,
                 task: str = "classification"):
        if output not in OUTPUTS:
            raise BackendError(f"output must be one of {OUTPUTS}, got {output!r}")
        if int(num_classes) < 1:
            raise BackendError(f"num_classes must be >= 1, got {num_classes!r}")
        _check_task(task)
        self.num_classes, self.device, self.output = int(num_classes), torch.device(device), output
        self.task = task
        self.batch_size = int(batch_size or self.batch_size)
        self.calls = 0

    def _scores(self, x: Tensor) -> Tensor:  # one chunk -> (n, K) or (n, K, H, W) raw scores
        raise NotImplementedError

    @torch.no_grad()
    def probs(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected (B, 3, H, W) input, got shape {tuple(x.shape)}")
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i:i + self.batch_size]
            s = torch.as_tensor(self._scores(chunk))
            if s.ndim != (4 if self.task == "segmentation" else 2) or s.shape[0] != chunk.shape[0]:
                raise BackendError(f"{self.kind} model returned shape {tuple(s.shape)} for "
                                   f"{chunk.shape[0]} images: not a {self.task} model "
                                   f"(expected {SCORE_TASKS[self.task]})")
            outs.append(_to_probs(s.to(self.device), self.output, self.task))
            self.calls += chunk.shape[0]
        if not outs:
            return torch.zeros(0, self.num_classes, device=self.device)
        return torch.cat(outs)

    def validate(self, input_size: Sequence[int]) -> "_Base":
        """One dry call on a zero image: shapes, class count, finiteness, probs summing to 1.

        Does not count towards ``calls`` (budgets are about explanations, not about loading)."""
        h, w = (int(s) for s in input_size)
        try:
            p = self.probs(torch.zeros(1, 3, h, w, device=self.device))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the dry call is a configuration problem
            raise BackendError(f"{self.kind} model fails on a zero batch of input size {h}x{w}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            self.calls = 0
        if p.shape[1] != self.num_classes:
            shape = f" (output shape {tuple(p.shape)}, expected (B, K, H, W))" if self.task == "segmentation" else ""
            raise BackendError(f"{self.kind} model outputs {p.shape[1]} scores, but num_classes is "
                               f"{self.num_classes}{shape}")
        if not torch.isfinite(p).all():
            raise BackendError(f"{self.kind} model outputs non-finite scores on a zero image")
        if self.output == "probs" and self.task == "multilabel":
            if float(p.min()) < -1e-6 or float(p.max()) > 1 + 1e-6:
                raise BackendError(f"output is 'probs' but the {self.kind} model's scores on a zero image range "
                                   f"from {float(p.min()):.4g} to {float(p.max()):.4g}, not within [0, 1]; "
                                   f"use output: logits")
        elif self.output == "probs":
            total = p.sum(1)  # per image, and per pixel for segmentation
            worst = float((total - 1).abs().max())
            if worst > 1e-3 or float(p.min()) < -1e-6:
                raise BackendError(f"output is 'probs' but the {self.kind} model's scores on a zero image sum to "
                                   f"{float(total.flatten()[(total - 1).abs().flatten().argmax()]):.4g} "
                                   f"(min {float(p.min()):.4g}); use output: logits")
        return self


class TorchBackend(_Base):
    """An ``nn.Module`` returning logits (or probabilities with ``output='probs'``)."""

    kind = "torch"

    def __init__(self, model: nn.Module, device: torch.device | str | None = None,
                 num_classes: int | None = None, output: str = "logits", batch_size: int | None = None,
                 task: str = "classification"):
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.model = model.eval()
        if num_classes is None:
            last = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not last:
                raise BackendError("give num_classes: the model has no Linear layer to read it from")
            num_classes = last[-1].out_features
        super().__init__(num_classes, device, output, batch_size, task)

    @classmethod
    def from_loaded(cls, lm, batch_size: int | None = None) -> "TorchBackend":
        """A ``modelspec.LoadedModel`` (gradient CAMs' model) as a black box."""
        task = lm.card.task if lm.card.task in SCORE_TASKS else "classification"
        return cls(lm.model, lm.device, lm.card.num_classes, batch_size=batch_size, task=task)

    def _scores(self, x: Tensor) -> Tensor:
        return output_scores(self.model(x.to(self.device)))


class CallableBackend(_Base):
    """``fn(x) -> scores`` for vendor models: x is a float32 (B, 3, H, W) CPU tensor (array-like,
    so ``np.asarray(x)`` works), scores anything ``torch.as_tensor`` takes, of shape (B, K)."""

    kind = "callable"

    def __init__(self, fn: Callable, num_classes: int, output: str = "logits",
                 device: torch.device | str = "cpu", batch_size: int | None = None, task: str = "classification"):
        if not callable(fn):
            raise BackendError(f"callable backend needs a function, got {type(fn).__name__}")
        self.fn = fn
        super().__init__(num_classes, device, output, batch_size, task)

    def _scores(self, x: Tensor) -> Tensor:
        s = self.fn(x.detach().float().cpu().contiguous())
        return torch.as_tensor(np.asarray(s) if not torch.is_tensor(s) else s)


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _ort_session(source: str | os.PathLike | bytes, providers: Sequence[str] | None = None,
                 threads: int | None = None):
    """An onnxruntime session of an ONNX file or its bytes -> (session, display name, device).

    ``providers`` None: CUDA when this onnxruntime build has it, else the CPU (never the remote
    'Azure' provider); ``threads`` defaults to torch's thread count (share cores like torch does)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.log_severity_level = 3
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        session = ort.InferenceSession(bytes(source) if isinstance(source, (bytes, bytearray))
                                       else name, sess_options=opts, providers=list(providers))
    except Exception as e:  # noqa: BLE001 - ort raises its own exception classes (Fail, InvalidProtobuf...)
        raise BackendError(f"cannot load ONNX model {name}: {str(e).strip().splitlines()[0][:300]}") from e
    cuda = "CUDAExecutionProvider" in session.get_providers() and torch.cuda.is_available()
    return session, name, torch.device("cuda" if cuda else "cpu")


def _onnx_source(weights: bytes | str | os.PathLike | None, providers: Sequence[str] | None, device: str):
    """Model-card ``weights`` of an ONNX model -> (bytes or local path, providers): any URI is read
    through ``storage``; ``device`` 'cpu' forces the CPU provider (:func:`_ort_providers`)."""
    if weights is None:
        raise BackendError("kind 'onnx' needs weights: the .onnx file")
    if isinstance(weights, str) and "://" in weights:
        from ..io import storage

        try:
            weights = storage.read_bytes(weights)
        except storage.StorageError as e:
            raise BackendError(f"cannot read ONNX model: {e}") from e
    elif not isinstance(weights, (bytes, bytearray)) and not os.path.exists(weights):
        raise BackendError(f"ONNX model file {weights} does not exist")
    return weights, _ort_providers(providers, device)


def _ort_providers(providers: Sequence[str] | None, device: str | torch.device) -> Sequence[str] | None:
    """Device 'cpu' forces the CPU provider; 'auto'/'cuda' leave the choice to :func:`_ort_session`."""
    if providers is None and str(device).startswith("cpu"):
        return ["CPUExecutionProvider"]
    return providers


class OnnxBackend(_Base):
    """An ONNX classifier through onnxruntime: one float image input (B, 3, H, W), one (B, K) output.

    A graph exported with a fixed batch dimension is fed chunks of exactly that size, the last one
    padded with zero images (not counted, results dropped)."""

    kind = "onnx"

    def __init__(self, source: str | os.PathLike | bytes, num_classes: int, output: str = "logits",
                 providers: Sequence[str] | None = None, input_size: Sequence[int] | None = None,
                 batch_size: int | None = None, threads: int | None = None, task: str = "classification"):
        self.session, name, dev = _ort_session(source, providers, threads)
        super().__init__(num_classes, dev, output, batch_size, task)
        self._check_graph(name, input_size)

    def _check_graph(self, name: str, input_size: Sequence[int] | None):
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1:
            raise BackendError(f"ONNX model {name} has {len(ins)} inputs {[i.name for i in ins]}; "
                               f"an image classifier has one")
        inp, out = ins[0], outs[0]
        if inp.type not in _ORT_DTYPES:
            raise BackendError(f"ONNX model {name} takes {inp.type}, not a float image tensor")
        if len(inp.shape) != 4:
            raise BackendError(f"ONNX model {name} input {inp.name!r} has shape {inp.shape}; "
                               f"expected (B, 3, H, W)")
        rank = 4 if self.task == "segmentation" else 2
        if out.shape is not None and len(out.shape) != rank:
            what = "a classifier" if self.task == "classification" else f"a {self.task} model"
            raise BackendError(f"ONNX model {name} is not {what}: output {out.name!r} has shape "
                               f"{out.shape} (rank {len(out.shape)}), expected {SCORE_TASKS[self.task]}")
        want = (3, *(int(s) for s in input_size)) if input_size is not None else None
        got = inp.shape[1:]
        if want is not None and any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise BackendError(f"ONNX model {name} expects input (B, {', '.join(map(str, got))}), but the "
                               f"card's input is (B, {', '.join(map(str, want))}) (channels, height, width)")
        k = out.shape[1] if out.shape is not None else None
        if isinstance(k, int) and k != self.num_classes:
            raise BackendError(f"ONNX model {name} outputs {k} classes, but num_classes is {self.num_classes}")
        self.input_name, self.output_name = inp.name, out.name
        self.np_dtype = _ORT_DTYPES[inp.type]
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        if self.fixed_batch:
            self.batch_size = self.fixed_batch

    def _scores(self, x: Tensor) -> Tensor:
        a = x.detach().cpu().numpy().astype(self.np_dtype, copy=False)
        n = a.shape[0]
        if self.fixed_batch and n < self.fixed_batch:  # pad the last chunk; results for padding dropped
            a = np.concatenate([a, np.zeros((self.fixed_batch - n, *a.shape[1:]), a.dtype)])
        y = self.session.run([self.output_name], {self.input_name: a})[0]
        if y.ndim != (4 if self.task == "segmentation" else 2):
            raise BackendError(f"ONNX model is not a {self.task} model: output has shape {y.shape}, "
                               f"expected {SCORE_TASKS[self.task]}")
        return torch.from_numpy(np.ascontiguousarray(y[:n]))


def import_object(spec: str, what: str, error: type[Exception] = None) -> Callable:
    """``package.module:name`` -> that object; ``error`` (a ConfigError type) naming ``what`` otherwise."""
    error = error or BackendError
    if not spec or ":" not in spec:
        raise error(f"{what} must be 'package.module:name', got {spec!r}")
    mod, name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise error(f"cannot import {what} {spec!r}: {e}") from e


def load_backend(kind: str, *, num_classes: int, input_size: Sequence[int], weights: bytes | str | None = None,
                 arch: str | None = None, output: str = "logits", device: str | torch.device = "auto",
                 model: nn.Module | None = None, providers: Sequence[str] | None = None,
                 batch_size: int | None = None, task: str = "classification") -> Backend:
    """Build and validate a backend from model-card fields.

    * ``kind='onnx'``: ``weights`` = the .onnx file (bytes, local path or any URI ``storage`` reads);
      ``device`` 'cpu' forces the CPU provider, 'auto'/'cuda' use CUDA when onnxruntime has it.
    * ``kind='callable'``: ``arch`` = ``package.module:function``, the scoring function itself.
    * ``kind='torch'``: ``model`` = an ``nn.Module`` (e.g. ``LoadedModel.model``).

    ``output`` says whether the model gives 'logits' (softmax applied; multilabel: sigmoid) or 'probs'.
    ``task``: 'classification' (B, K), 'multilabel' (B, K) or 'segmentation' (B, K, H, W). One dry call
    on a zero image checks everything before any data is read; failures raise :class:`BackendError`.
    """
    if kind not in KINDS:
        raise BackendError(f"backend kind must be one of {KINDS}, got {kind!r}")
    _check_task(task)
    if output not in OUTPUTS:
        raise BackendError(f"output must be one of {OUTPUTS}, got {output!r}")
    if len(tuple(input_size)) != 2:
        raise BackendError(f"input_size must be (height, width), got {input_size!r}")
    dev = str(device)
    if kind == "onnx":
        weights, providers = _onnx_source(weights, providers, dev)
        b: _Base = OnnxBackend(weights, num_classes, output, providers, input_size, batch_size, task=task)
    elif kind == "callable":
        b = CallableBackend(import_object(arch or "", "kind 'callable' arch (a scoring function)"), num_classes, output,
                            "cpu" if dev == "auto" else device, batch_size, task=task)
    else:
        if model is None:
            raise BackendError("kind 'torch' needs the model")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        b = TorchBackend(model.to(dev), dev, num_classes, output, batch_size, task=task)
    return b.validate(input_size)


# --- detectors -------------------------------------------------------------------------------------

DETECTION_KEYS = ("boxes", "labels", "scores")


class DetectorOutputError(CamgateError, ValueError):
    """A detector's output breaks the convention of :func:`check_detections`; the message names what.

    Raised on every call that returns a wrong structure; :func:`load_detector_backend` turns it into a
    :class:`BackendError` naming the model (its dry call)."""


def _array(v, what: str) -> Tensor:
    try:
        t = v.detach() if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as e:
        raise DetectorOutputError(f"{what} is not an array of numbers ({type(v).__name__})") from e
    if t.dtype == torch.bool or t.is_complex():
        raise DetectorOutputError(f"{what} is not an array of real numbers ({t.dtype})")
    return t.cpu()


def _check_one(o, i: int, num_classes: int) -> dict:
    if not isinstance(o, Mapping):
        raise DetectorOutputError(f"result {i} is a {type(o).__name__}, not a mapping with "
                                  f"{', '.join(map(repr, DETECTION_KEYS))}")
    for k in DETECTION_KEYS:
        if k not in o:
            raise DetectorOutputError(f"result {i} has no {k!r}")
    boxes, labels, scores = (_array(o[k], f"result {i}: {k!r}") for k in DETECTION_KEYS)
    if boxes.numel() == 0 and boxes.ndim < 2:  # an empty list: no detections
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DetectorOutputError(f"result {i}: 'boxes' has shape {tuple(boxes.shape)}, expected (M, 4)")
    for k, t in (("labels", labels), ("scores", scores)):
        if t.ndim != 1:
            raise DetectorOutputError(f"result {i}: {k!r} has shape {tuple(t.shape)}, expected (M,)")
    m = boxes.shape[0]
    if not labels.shape[0] == scores.shape[0] == m:
        raise DetectorOutputError(f"result {i}: {m} boxes, {labels.shape[0]} labels and {scores.shape[0]} "
                                  f"scores; expected one of each per detection")
    out = {"boxes": boxes.float().contiguous(), "scores": scores.float().contiguous()}
    for k, t in out.items():
        if not torch.isfinite(t).all():
            raise DetectorOutputError(f"result {i}: {k!r} has non-finite values (NaN or inf)")
    if labels.is_floating_point():
        if not (torch.isfinite(labels).all() and torch.equal(labels, labels.round())):
            raise DetectorOutputError(f"result {i}: 'labels' are not whole numbers")
    labels = labels.long()
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise DetectorOutputError(f"result {i}: label {int(bad[0])} outside the model's {num_classes} classes "
                                  f"(0 to {num_classes - 1})")
    out["labels"] = labels.contiguous()
    if o.get("probs") is not None:
        probs = _array(o["probs"], f"result {i}: 'probs'")
        if probs.ndim != 2 or tuple(probs.shape) != (m, num_classes):
            raise DetectorOutputError(f"result {i}: 'probs' has shape {tuple(probs.shape)}, expected "
                                      f"(M, K) = ({m}, {num_classes})")
        if not torch.isfinite(probs).all():
            raise DetectorOutputError(f"result {i}: 'probs' has non-finite values (NaN or inf)")
        out["probs"] = probs.float().contiguous()
    return {k: out[k] for k in (*DETECTION_KEYS, "probs") if k in out}


def check_detections(outs, n: int, num_classes: int, first: int = 0) -> list[dict]:
    """A detector's raw output for ``n`` images -> per image a dict of CPU tensors ``boxes`` float32
    (M, 4), ``labels`` int64 (M,), ``scores`` float32 (M,) and, when given, ``probs`` float32 (M, K).

    ``outs`` must be a sequence of ``n`` mappings with those keys (tensors, numpy arrays or lists);
    M may differ per image. Checked: the count, keys, shapes, equal M, finite values, whole-number
    labels in [0, num_classes), probs of K = num_classes columns. Other keys are dropped. Results
    are numbered from ``first`` in messages. Raises :class:`DetectorOutputError`."""
    if isinstance(outs, (Mapping, Tensor, np.ndarray, str, bytes)) or not isinstance(outs, Iterable):
        raise DetectorOutputError(f"the detector returned a {type(outs).__name__}; expected a list of "
                                  f"{n} results (one mapping per image)")
    outs = list(outs)
    if len(outs) != n:
        raise DetectorOutputError(f"the detector returned {len(outs)} results for {n} image{'s' * (n != 1)}")
    return [_check_one(o, first + i, num_classes) for i, o in enumerate(outs)]


class DetectorBackend:
    """An object detector as a black box: ``backend(x) -> list[dict]``, the callable D-RISE takes.

    * ``x``: (n, 3, H, W) float, in the model's input convention (torchvision detectors: [0, 1],
      they normalise inside);
    * returns per image what :func:`check_detections` returns (CPU tensors ``boxes`` (M, 4) xyxy in
      input pixels, ``labels`` (M,), ``scores`` (M,), ``probs`` (M, K) when the model gives them),
      every call checked (:class:`DetectorOutputError`);
    * ``calls`` counts the images evaluated (padding excluded; the load-time dry call not counted);
    * the model sees chunks of at most ``batch_size`` images.
    """

    kind = "?"
    batch_size = 16

    def __init__(self, num_classes: int, device: torch.device | str, batch_size: int | None, name: str):
        if int(num_classes) < 1:
            raise BackendError(f"num_classes must be >= 1, got {num_classes!r}")
        self.num_classes, self.device, self.name = int(num_classes), torch.device(device), name
        self.batch_size = int(batch_size or self.batch_size)
        self.calls = 0

    def _detect(self, x: Tensor) -> Sequence[Mapping]:  # one chunk -> its raw results
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x: Tensor) -> list[dict]:
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"expected a (n, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        out: list[dict] = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i:i + self.batch_size]
            raw = self._detect(chunk)
            self.calls += chunk.shape[0]
            out += check_detections(raw, chunk.shape[0], self.num_classes, first=i)
        return out

    def validate(self, input_size: Sequence[int]) -> "DetectorBackend":
        """One dry call on a zero image (1, 3, H, W): the output structure, before any data is read."""
        h, w = (int(s) for s in input_size)
        try:
            self(torch.zeros(1, 3, h, w, device=self.device))
        except DetectorOutputError as e:
            raise BackendError(f"{self.kind} model {self.name} returns the wrong structure: {e}") from e
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the dry call is a configuration problem
            raise BackendError(f"{self.kind} model {self.name} fails on a zero image of input size {h}x{w}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            self.calls = 0
        return self


def _detector_classes(model: nn.Module) -> int | None:
    """The class count (background included) of torchvision's detectors, or ``model.num_classes``."""
    k = getattr(model, "num_classes", None)
    if isinstance(k, int):
        return k
    cls = getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
    if isinstance(cls, nn.Linear):  # Faster / Mask / Keypoint R-CNN
        return cls.out_features
    head = getattr(getattr(model, "head", None), "classification_head", None)
    for attr in ("num_classes", "num_columns"):  # RetinaNet, FCOS / SSD, SSDlite
        if isinstance(getattr(head, attr, None), int):
            return getattr(head, attr)
    return None


class TorchDetectorBackend(DetectorBackend):
    """A torchvision-style detector ``nn.Module`` (eval mode, no grad): a list of (3, H, W) images
    in, a list of dicts out. ``num_classes`` is read from torchvision's detectors when not given."""

    kind = "torch"

    def __init__(self, model: nn.Module, device: torch.device | str | None = None,
                 num_classes: int | None = None, batch_size: int | None = None):
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.model = model.eval()
        name = type(model).__name__
        found = _detector_classes(model)
        if num_classes is None:
            if found is None:
                raise BackendError(f"give num_classes: cannot read the class count of detector {name}")
            num_classes = found
        elif found is not None and found != int(num_classes):
            raise BackendError(f"torch model {name} has {found} classes, but num_classes is {num_classes}")
        super().__init__(num_classes, device, batch_size, name)

    def _detect(self, x: Tensor) -> Sequence[Mapping]:
        return self.model(list(x.to(self.device)))


class CallableDetectorBackend(DetectorBackend):
    """``fn(x) -> results`` for vendor detectors: x is a float32 (n, 3, H, W) CPU tensor (array-like,
    so ``np.asarray(x)`` works); results a sequence of n mappings of tensors, arrays or lists."""

    kind = "callable"

    def __init__(self, fn: Callable, num_classes: int, device: torch.device | str = "cpu",
                 batch_size: int | None = None, name: str | None = None):
        if not callable(fn):
            raise BackendError(f"callable backend needs a function, got {type(fn).__name__}")
        self.fn = fn
        name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        super().__init__(num_classes, device, batch_size, name)

    def _detect(self, x: Tensor) -> Sequence[Mapping]:
        return self.fn(x.detach().float().cpu().contiguous())


class OnnxDetectorBackend(DetectorBackend):
    """An ONNX detector through onnxruntime.

    Input: one float tensor, (B, 3, H, W), or (3, H, W) as torchvision's export of a detector called
    on a list of one image gives. Outputs: those named ``boxes``, ``labels``, ``scores`` (and
    ``probs`` (.., K) when one is so named); without those names, the first three outputs, in that
    order. Per run, either

    * per image: boxes (M, 4), labels (M,), scores (M,) — the graph is fed ONE image per run
      (torchvision's export; chosen when the declared rank of the boxes output is not 3), or
    * batched: boxes (B, M, 4), labels (B, M), scores (B, M), each image's rows padded to M; rows
      with score <= 0 are padding and dropped. A fixed batch dimension is fed chunks of exactly that
      size, the last one padded with zero images (not counted, results dropped).
    """

    kind = "onnx"

    def __init__(self, source: str | os.PathLike | bytes, num_classes: int, device: torch.device | str = "auto",
                 providers: Sequence[str] | None = None, input_size: Sequence[int] | None = None,
                 batch_size: int | None = None, threads: int | None = None):
        self.session, name, dev = _ort_session(source, _ort_providers(providers, device), threads)
        super().__init__(num_classes, dev, batch_size, name)
        self._check_graph(input_size)

    def _check_graph(self, input_size: Sequence[int] | None):
        name, ins, outs = self.name, self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1:
            raise BackendError(f"ONNX model {name} has {len(ins)} inputs {[i.name for i in ins]}; "
                               f"a detector backend feeds one image tensor")
        inp = ins[0]
        if inp.type not in _ORT_DTYPES:
            raise BackendError(f"ONNX model {name} takes {inp.type}, not a float image tensor")
        if len(inp.shape) not in (3, 4):
            raise BackendError(f"ONNX model {name} input {inp.name!r} has shape {inp.shape}; "
                               f"expected (B, 3, H, W) or (3, H, W)")
        self.single = len(inp.shape) == 3  # torchvision's export: one (3, H, W) image
        got = inp.shape[-3:]
        want = (3, *(int(s) for s in input_size)) if input_size is not None else None
        if want is not None and any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise BackendError(f"ONNX model {name} expects images ({', '.join(map(str, got))}), but the "
                               f"card's input is ({', '.join(map(str, want))}) (channels, height, width)")
        names = [o.name for o in outs]
        if set(DETECTION_KEYS) <= set(names):
            picked = keys = list(DETECTION_KEYS) + (["probs"] if "probs" in names else [])
        elif len(outs) >= 3:
            picked, keys = names[:3], list(DETECTION_KEYS)
        else:
            raise BackendError(f"ONNX model {name} has {len(outs)} output(s) {names}: not a detector "
                               f"(expected boxes, labels, scores)")
        box_shape = outs[names.index(picked[0])].shape
        rank = len(box_shape) if box_shape is not None else None
        if rank not in (None, 2, 3):
            raise BackendError(f"ONNX model {name} is not a detector: boxes output {picked[0]!r} has shape "
                               f"{box_shape}, expected (M, 4) or (B, M, 4)")
        self.input_name, self.output_names, self.keys = inp.name, picked, keys
        self.np_dtype = _ORT_DTYPES[inp.type]
        self.batched = rank == 3 and not self.single
        fixed = inp.shape[0] if not self.single and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.fixed_batch = 1 if not self.batched else fixed
        if self.fixed_batch:
            self.batch_size = self.fixed_batch

    def _run(self, a: np.ndarray) -> dict:
        return dict(zip(self.keys, self.session.run(self.output_names, {self.input_name: a})))

    def _detect(self, x: Tensor) -> Sequence[Mapping]:
        a = x.detach().cpu().numpy().astype(self.np_dtype, copy=False)
        n = a.shape[0]
        if not self.batched:  # one image per run
            outs = []
            for j in range(n):
                r = self._run(a[j] if self.single else a[j:j + 1])
                if np.ndim(r["boxes"]) == 3 and len(r["boxes"]) == 1:  # a batch of one after all
                    r = {k: v[0] for k, v in r.items()}
                outs.append(r)
            return outs
        if self.fixed_batch and n < self.fixed_batch:  # pad the last chunk; results for padding dropped
            a = np.concatenate([a, np.zeros((self.fixed_batch - n, *a.shape[1:]), a.dtype)])
        r = self._run(a)
        sizes = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in r.items()}
        if any(s != a.shape[0] for s in sizes.values()):
            raise DetectorOutputError(f"the ONNX model returned outputs of leading sizes {sizes} for a batch "
                                      f"of {a.shape[0]} images; expected (B, M, 4), (B, M), (B, M)")
        outs = []
        for j in range(n):
            o = {k: v[j] for k, v in r.items()}
            s = np.asarray(o["scores"])
            if s.ndim == 1 and all(np.shape(v)[:1] == s.shape for v in o.values()):
                keep = s > 0  # padding rows
                o = {k: v[keep] for k, v in o.items()}
            outs.append(o)
        return outs


def load_detector_backend(kind: str, *, num_classes: int, input_size: Sequence[int],
                          weights: bytes | str | None = None, arch: str | None = None,
                          device: str | torch.device = "cpu", model: nn.Module | None = None,
                          providers: Sequence[str] | None = None, batch_size: int | None = None) -> DetectorBackend:
    """Build and validate a detector backend from model-card fields (``task: detection``).

    * ``kind='onnx'``: ``weights`` = the .onnx file (bytes, local path or any URI ``storage`` reads),
      in :class:`OnnxDetectorBackend`'s convention; ``device`` 'cpu' forces the CPU provider;
    * ``kind='callable'``: ``arch`` = ``package.module:function``, the detector function itself;
    * ``kind='torch'``: ``model`` = a torchvision-style detector module.

    One dry call on a zero image (1, 3, H, W) checks the output structure before any data is read;
    every failure raises :class:`BackendError` naming the model."""
    if kind not in KINDS:
        raise BackendError(f"backend kind must be one of {KINDS}, got {kind!r}")
    if len(tuple(input_size)) != 2:
        raise BackendError(f"input_size must be (height, width), got {input_size!r}")
    dev = str(device)
    if kind == "onnx":
        weights, providers = _onnx_source(weights, providers, dev)
        b: DetectorBackend = OnnxDetectorBackend(weights, num_classes, dev, providers, input_size, batch_size)
    elif kind == "callable":
        fn = import_object(arch or "", "kind 'callable' arch (a detector function)")
        b = CallableDetectorBackend(fn, num_classes, "cpu" if dev == "auto" else device, batch_size, name=arch)
    else:
        if model is None:
            raise BackendError("kind 'torch' needs the model")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        b = TorchDetectorBackend(model.to(dev), dev, num_classes, batch_size)
    return b.validate(input_size)
