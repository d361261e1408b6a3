"""Run a classifier as a black box: normalised images in, class probabilities out.

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
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError

OUTPUTS = ("logits", "probs")
KINDS = ("torch", "onnx", "callable")


class BackendError(ConfigError):
    """The model behind a backend is unusable (file, shapes, outputs); raised at load."""


@runtime_checkable
class Backend(Protocol):
    kind: str  # 'torch' | 'onnx' | 'callable'
    num_classes: int
    device: torch.device
    calls: int  # images evaluated so far

    def probs(self, x: Tensor) -> Tensor: ...


def _to_probs(scores: Tensor, output: str) -> Tensor:
    scores = scores.float()
    return scores.softmax(1) if output == "logits" else scores


class _Base:
    """Chunking, counting and the load-time check shared by the backends."""

    kind = "?"
    output = "logits"
    batch_size = 64

    def __init__(self, num_classes: int, device: torch.device, output: str, batch_size: int | None):
        if output not in OUTPUTS:
            raise BackendError(f"output must be one of {OUTPUTS}, got {output!r}")
        if int(num_classes) < 1:
            raise BackendError(f"num_classes must be >= 1, got {num_classes!r}")
        self.num_classes, self.device, self.output = int(num_classes), torch.device(device), output
        self.batch_size = int(batch_size or self.batch_size)
        self.calls = 0

    def _scores(self, x: Tensor) -> Tensor:  # one chunk -> (n, K) raw scores
        raise NotImplementedError

    @torch.no_grad()
    def probs(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected (B, 3, H, W) input, got shape {tuple(x.shape)}")
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i:i + self.batch_size]
            s = torch.as_tensor(self._scores(chunk))
            if s.ndim != 2 or s.shape[0] != chunk.shape[0]:
                raise BackendError(f"{self.kind} model returned shape {tuple(s.shape)} for "
                                   f"{chunk.shape[0]} images: not a classifier (expected (B, K))")
            outs.append(_to_probs(s.to(self.device), self.output))
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
            raise BackendError(f"{self.kind} model outputs {p.shape[1]} scores, but num_classes is "
                               f"{self.num_classes}")
        if not torch.isfinite(p).all():
            raise BackendError(f"{self.kind} model outputs non-finite scores on a zero image")
        if self.output == "probs" and (abs(float(p.sum()) - 1) > 1e-3 or float(p.min()) < -1e-6):
            raise BackendError(f"output is 'probs' but the {self.kind} model's scores on a zero image "
                               f"sum to {float(p.sum()):.4g} (min {float(p.min()):.4g}); use output: logits")
        return self


class TorchBackend(_Base):
    """An ``nn.Module`` returning logits (or probabilities with ``output='probs'``)."""

    kind = "torch"

    def __init__(self, model: nn.Module, device: torch.device | str | None = None,
                 num_classes: int | None = None, output: str = "logits", batch_size: int | None = None):
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.model = model.eval()
        if num_classes is None:
            last = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not last:
                raise BackendError("give num_classes: the model has no Linear layer to read it from")
            num_classes = last[-1].out_features
        super().__init__(num_classes, device, output, batch_size)

    @classmethod
    def from_loaded(cls, lm, batch_size: int | None = None) -> "TorchBackend":
        """A ``modelspec.LoadedModel`` (gradient CAMs' model) as a black box."""
        return cls(lm.model, lm.device, lm.card.num_classes, batch_size=batch_size)

    def _scores(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.device))


class CallableBackend(_Base):
    """``fn(x) -> scores`` for vendor models: x is a float32 (B, 3, H, W) CPU tensor (array-like,
    so ``np.asarray(x)`` works), scores anything ``torch.as_tensor`` takes, of shape (B, K)."""

    kind = "callable"

    def __init__(self, fn: Callable, num_classes: int, output: str = "logits",
                 device: torch.device | str = "cpu", batch_size: int | None = None):
        if not callable(fn):
            raise BackendError(f"callable backend needs a function, got {type(fn).__name__}")
        self.fn = fn
        super().__init__(num_classes, device, output, batch_size)

    def _scores(self, x: Tensor) -> Tensor:
        s = self.fn(x.detach().float().cpu().contiguous())
        return torch.as_tensor(np.asarray(s) if not torch.is_tensor(s) else s)


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxBackend(_Base):
    """An ONNX classifier through onnxruntime: one float image input (B, 3, H, W), one (B, K) output.

    A graph exported with a fixed batch dimension is fed chunks of exactly that size, the last one
    padded with zero images (not counted, results dropped)."""

    kind = "onnx"

    def __init__(self, source: str | os.PathLike | bytes, num_classes: int, output: str = "logits",
                 providers: Sequence[str] | None = None, input_size: Sequence[int] | None = None,
                 batch_size: int | None = None, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            # CUDA when this onnxruntime build has it, never the remote 'Azure' provider
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())  # share cores like torch does
        opts.log_severity_level = 3
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        try:
            self.session = ort.InferenceSession(bytes(source) if isinstance(source, (bytes, bytearray))
                                                else name, sess_options=opts, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - ort raises its own exception classes (Fail, InvalidProtobuf...)
            raise BackendError(f"cannot load ONNX model {name}: {str(e).strip().splitlines()[0][:300]}") from e
        used = self.session.get_providers()
        cuda = "CUDAExecutionProvider" in used and torch.cuda.is_available()
        super().__init__(num_classes, torch.device("cuda" if cuda else "cpu"), output, batch_size)
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
        if out.shape is not None and len(out.shape) != 2:
            raise BackendError(f"ONNX model {name} is not a classifier: output {out.name!r} has shape "
                               f"{out.shape} (rank {len(out.shape)}), expected (B, K)")
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
        if y.ndim != 2:
            raise BackendError(f"ONNX model is not a classifier: output has shape {y.shape}, expected (B, K)")
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
                 batch_size: int | None = None) -> Backend:
    """Build and validate a backend from model-card fields.

    * ``kind='onnx'``: ``weights`` = the .onnx file (bytes, local path or any URI ``storage`` reads);
      ``device`` 'cpu' forces the CPU provider, 'auto'/'cuda' use CUDA when onnxruntime has it.
    * ``kind='callable'``: ``arch`` = ``package.module:function``, the scoring function itself.
    * ``kind='torch'``: ``model`` = an ``nn.Module`` (e.g. ``LoadedModel.model``).

    ``output`` says whether the model gives 'logits' (softmax applied) or 'probs'. One dry call on a
    zero image checks everything before any data is read; failures raise :class:`BackendError`.
    """
    if kind not in KINDS:
        raise BackendError(f"backend kind must be one of {KINDS}, got {kind!r}")
    if output not in OUTPUTS:
        raise BackendError(f"output must be one of {OUTPUTS}, got {output!r}")
    if len(tuple(input_size)) != 2:
        raise BackendError(f"input_size must be (height, width), got {input_size!r}")
    dev = str(device)
    if kind == "onnx":
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
        if providers is None and dev.startswith("cpu"):
            providers = ["CPUExecutionProvider"]
        b: _Base = OnnxBackend(weights, num_classes, output, providers, input_size, batch_size)
    elif kind == "callable":
        b = CallableBackend(import_object(arch or "", "kind 'callable' arch (a scoring function)"), num_classes, output,
                            "cpu" if dev == "auto" else device, batch_size)
    else:
        if model is None:
            raise BackendError("kind 'torch' needs the model")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        b = TorchBackend(model.to(dev), dev, num_classes, output, batch_size)
    return b.validate(input_size)
