"""Model card -> ``nn.Module`` in eval mode (or a black-box backend), with its weights' hash,
input preprocessing and resolved target layer(s). Weights load with ``weights_only=True`` or from
safetensors; full pickled models are refused unless the card allows them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..data.geometry import InputSpec
from ..errors import ModelCardError
from ..io import storage
from .backends import (Backend, BackendError, DetectorOutputError, check_detections, check_scores, import_object,
                       load_backend, load_detector_backend)
from .card import ModelCard
from .layers import (check_layers, default_detection_layers, default_segmentation_layers, default_target_layers,
                     resolve_layers, token_kind)

# --- architectures -------------------------------------------------------------------------

def build_arch(arch: str, num_classes: int, task: str = "classification",
               size: tuple[int, int] | None = None) -> nn.Module:
    """``torchvision/<name>`` or ``package.module:factory`` -> an uninitialised module.

    torchvision detectors and segmentation models are built without any (downloading) weights;
    detectors that resize inside (R-CNN, RetinaNet, FCOS) keep the card's input size instead of their
    800-pixel default; segmentation models without the auxiliary head, returning their ``out`` scores
    (:func:`segmentation_output`)."""
    if arch.startswith("torchvision/"):
        import torchvision.models as tvm

        name = arch.split("/", 1)[1]
        if name not in tvm.list_models():
            raise ModelCardError(f"unknown torchvision architecture {name!r}")
        family = ("detection" if name in tvm.list_models(module=tvm.detection) else
                  "segmentation" if name in tvm.list_models(module=tvm.segmentation) else None)
        fits = (family,) if family else ("classification", "multilabel")
        if task not in fits:
            what = {"detection": "a detector", "segmentation": "a segmentation model"}.get(family, "a classifier")
            raise ModelCardError(f"torchvision/{name} is {what}, not a {task} model: the model card needs "
                                 f"task: {' or '.join(fits)}")
        if task == "detection":
            extra = {} if name.startswith("ssd") or size is None else {"min_size": min(size), "max_size": max(size)}
            return tvm.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **extra)
        if task == "segmentation":
            return segmentation_output(tvm.get_model(name, weights=None, weights_backbone=None,
                                                     num_classes=num_classes, aux_loss=False))
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    if ":" not in arch:
        raise ModelCardError(f"arch must be 'torchvision/<name>' or 'package.module:factory', got {arch!r}")
    factory = import_object(arch, "factory", ModelCardError)
    try:
        return factory(num_classes=num_classes)
    except TypeError:  # factories without a num_classes argument
        return factory()


class SegmentationOutput(nn.Module):
    """The mark (and forward) of a segmentation model turned by :func:`segmentation_output` into one
    returning its scores tensor (B, K, H, W) instead of torchvision's dict (``out``, and ``aux`` with
    the auxiliary head), so every consumer of ``model(x)`` (CAM engines, backends, sanity checks)
    sees a plain tensor."""

    scores_key = "out"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out[self.scores_key] if isinstance(out, Mapping) else out


_SCORE_CLASSES: dict[tuple[type, str], type] = {}


def segmentation_output(model: nn.Module, key: str = "out") -> nn.Module:
    """``model`` itself, its class swapped for a subclass whose forward returns the dict output's ``key``.

    In place rather than wrapped: the module keeps its names (target layers such as
    ``backbone.layer4``), state_dict keys (torchvision's weight files load as they are), parameters,
    buffers and hooks; a wrapper module would prefix every name."""
    if isinstance(model, SegmentationOutput):
        return model
    cls = type(model)
    sub = _SCORE_CLASSES.get((cls, key))
    if sub is None:
        sub = type(f"{cls.__name__}Scores", (SegmentationOutput, cls), {"scores_key": key, "__module__": __name__})
        _SCORE_CLASSES[(cls, key)] = sub
    model.__class__ = sub
    return model


# --- weights ---------------------------------------------------------------------------------

def load_state(data: bytes, name: str, allow_pickle: bool) -> dict:
    """Bytes of a safetensors or ``.pt`` file -> state_dict. Full pickled models are refused."""
    if name.endswith(".safetensors") or data[:8] and _looks_safetensors(data):
        from safetensors.torch import load as st_load

        return st_load(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        if not allow_pickle:
            raise ModelCardError(
                f"weights {name} are not a plain state_dict (refused to unpickle arbitrary objects; "
                f"set allow_pickle: true in the card only for files you trust): {str(e).splitlines()[0]}") from e
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelCardError(f"weights {name} hold a {type(obj).__name__}, not a state_dict")
    return obj


def _looks_safetensors(data: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n < len(data) and data[8:9] == b"{"


# --- the loaded model --------------------------------------------------------------------------

@dataclass
class LoadedModel:
    card: ModelCard
    model: nn.Module | None  # None for black-box kinds: only ``backend`` reaches them
    target_layers: list[str]
    weights_sha256: str
    device: torch.device
    reshape_transform: Callable | None = None
    backend: Backend | None = None  # set for black-box kinds; torch cards build one when a method needs it

    @property
    def input(self) -> InputSpec:
        return self.card.input

    def layers(self) -> list[nn.Module]:
        if self.model is None:
            raise ModelCardError(f"model card kind {self.card.kind!r} is a black box: it has no layers "
                                 f"(heatmaps from outputs only: methods "
                                 f"{'drise' if self.card.detection else 'decam, rise'})")
        return resolve_layers(self.model, self.target_layers)

    def detector_backend(self):
        """A torch detector as a black box (D-RISE reaches it through its outputs only)."""
        from .backends import TorchDetectorBackend

        return TorchDetectorBackend(self.model, self.device, num_classes=self.card.num_classes)

    def metadata(self) -> dict:
        md = {"name": self.card.name, "arch": self.card.arch, "num_classes": self.card.num_classes,
              "classes": self.card.classes, "input": self.card.input.to_dict(),
              "target_layer": self.target_layers, "reshape": self.card.reshape,
              "weights_sha256": self.weights_sha256, "card_sha256": self.card.sha256}
        if self.card.black_box:  # absent = torch: torch runs keep their fingerprint (resume across versions)
            md.update(kind=self.card.kind, output=self.card.output)
        if self.card.task != "classification":  # classifier runs keep their fingerprint
            md["task"] = self.card.task
        return md


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelCardError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def load_model(card: ModelCard | str, device: str = "auto", target_layer: Sequence[str] | str | None = None
               ) -> LoadedModel:
    """Build, load weights, freeze, resolve the target layers and check them with one dry forward."""
    if isinstance(card, str):
        card = ModelCard.load(card)
    if card.black_box:
        return _load_black_box(card, device, target_layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a card without weights still gives the same model on every load
        model = build_arch(card.arch, card.num_classes, card.task, card.input.size)
    sha = ""
    wuri = card.weights_uri()
    if wuri:
        try:
            data = storage.read_bytes(wuri)
        except storage.StorageError as e:
            raise ModelCardError(f"cannot read weights: {e}") from e
        sha = hashlib.sha256(data).hexdigest()
        state = load_state(data, wuri, card.allow_pickle)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelCardError(f"weights {wuri} do not fit {card.arch}: {str(e)[:600]}") from e
    model.eval().requires_grad_(False)
    if target_layer:
        layers = [target_layer] if isinstance(target_layer, str) else list(target_layer)
    else:
        layers = card.target_layer or (default_detection_layers(model) if card.detection else
                                       default_segmentation_layers(model, card.arch) if card.segmentation
                                       else default_target_layers(model, card.arch))
    resolve_layers(model, layers)  # fail now, before any data is read
    dev = pick_device(device)
    model.to(dev)
    kind = card.reshape or token_kind(card.arch, layers)
    # the dry forward finds every configuration problem now (layer, shape, output), not per batch
    reshape, out = check_layers(model, list(layers), kind, dev, card.input.size)
    if card.detection:
        try:
            check_detections(out, 1, card.num_classes)
        except DetectorOutputError as e:
            raise ModelCardError(f"model card {card.name}: the detector returns the wrong structure: {e} "
                                 f"(expected torchvision's convention: per image boxes, labels, scores)") from None
        return LoadedModel(card, model, list(layers), sha, dev, reshape)
    if card.segmentation and isinstance(out, Mapping) and "out" in out:  # a factory in torchvision's convention
        model, out = segmentation_output(model), out["out"]
    check_scores(out, card.task, card.num_classes, f"model card {card.name}: the model", error=ModelCardError)
    return LoadedModel(card, model, list(layers), sha, dev, reshape)


def _load_black_box(card: ModelCard, device: str, target_layer) -> LoadedModel:
    """ONNX file or scoring function -> a validated backend (one dry call on a zero image)."""
    if target_layer:
        raise ModelCardError(f"model card kind {card.kind!r} has no layers: a target layer does not apply "
                             f"(black boxes take the methods decam and rise)")
    pick_device(device)  # the same device errors as torch cards
    data, sha, name = None, "", card.arch
    if card.kind == "onnx":
        name = card.weights_uri()
        try:
            data = storage.read_bytes(name)
        except storage.StorageError as e:
            raise ModelCardError(f"cannot read ONNX model: {e}") from e
        sha = hashlib.sha256(data).hexdigest()
    if card.detection:
        try:
            backend = load_detector_backend(card.kind, num_classes=card.num_classes, input_size=card.input.size,
                                            weights=data, arch=card.arch, device=device)
        except BackendError as e:
            raise ModelCardError(f"model card {card.name}: {str(e).replace('<bytes>', str(name))}") from e
        return LoadedModel(card, None, [], sha, backend.device, backend=backend)
    try:
        backend = load_backend(card.kind, num_classes=card.num_classes, input_size=card.input.size, weights=data,
                               arch=card.arch, output=card.output, device=device, task=card.task)
    except BackendError as e:  # the backend names bytes '<bytes>'; say which file the card points to
        raise ModelCardError(f"model card {card.name}: {str(e).replace('<bytes>', str(name))}") from e
    return LoadedModel(card, None, [], sha, backend.device, backend=backend)


def resolved_card(lm: LoadedModel) -> dict:
    """The card as loaded, self-contained: ``weights`` as an absolute URI and the target layers
    filled in, so it loads the same model from any working directory."""
    card = lm.card.to_dict()
    weights = lm.card.weights_uri()
    if weights and "://" not in weights:  # a local path: later readers run in other directories
        weights = os.path.abspath(weights)
    card.update(weights=weights, target_layer=lm.target_layers)
    if lm.card.allow_pickle:
        card["allow_pickle"] = True
    return card


def card_json(lm: LoadedModel) -> str:
    return json.dumps(lm.metadata(), sort_keys=True)
