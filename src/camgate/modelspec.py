"""Model card -> ``nn.Module`` in eval mode, input preprocessing and target layer(s).

A model card is YAML/JSON (local path or s3://)::

    name: underpass-resnet18
    arch: torchvision/resnet18          # or package.module:factory
    num_classes: 4
    classes: [pedestrian, bike, dog, empty]
    weights: weights.safetensors        # relative -> next to the card
    input: {size: [224, 224], mean: [...], std: [...], resize: stretch}
    target_layer: layer4                # or a list; default per architecture
    reshape: vit                        # token -> map reshape for ViT/Swin layers

Black boxes (heatmaps from outputs only: methods ``decam``, ``rise``)::

    kind: onnx                          # weights: the .onnx file; no arch, no target_layer
    kind: callable                      # arch: package.module:function, the scoring function itself
    output: probs                       # what the model returns: logits (default) or probs
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from . import storage
from .backends import KINDS, OUTPUTS, Backend, BackendError, import_object, load_backend
from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("stretch", "center_crop")


class ModelCardError(ConfigError):
    """The model card (or what it points to) is unusable; raised before any compute."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor.

    ``stretch`` resizes the whole image to ``size``; ``center_crop`` resizes the shorter side to
    ``resize_to`` and crops ``size`` from the centre (the classic ImageNet evaluation transform).
    ``box`` tells which region of the original image the model sees, so masks can be cut the same way.
    """

    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch"
    resize_to: int | None = None

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ModelCardError(f"input.resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ModelCardError(f"input.size must be [height, width], got {self.size!r}")

    @classmethod
    def from_card(cls, d: dict | None) -> "InputSpec":
        d = dict(d or {})
        size = d.pop("size", (224, 224))
        size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        unknown = set(d) - {"mean", "std", "resize", "resize_to"}
        if unknown:
            raise ModelCardError(f"unknown input keys {sorted(unknown)}")
        return cls(
            size=size,
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
            resize=d.get("resize", "stretch"),
            resize_to=d.get("resize_to"),
        )

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the original image that ends up in the model input."""
        if self.resize == "stretch":
            return (0, 0, width, height)
        h, w = self.size
        short = self.resize_to or round(min(h, w) * 256 / 224)
        scale = short / min(width, height)
        # crop size expressed in original pixels, centred like torchvision's CenterCrop
        cw, ch = min(width, w / scale), min(height, h / scale)
        left, top = (width - cw) / 2, (height - ch) / 2
        return (round(left), round(top), round(left + cw), round(top + ch))

    def image_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float32 CHW tensor of ``size``."""
        h, w = self.size
        img = img.crop(self.box(*img.size)).resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "resize_to": self.resize_to}


@dataclass
class ModelCard:
    name: str
    arch: str | None  # None only for kind 'onnx'
    num_classes: int
    weights: str | None = None
    classes: list[str] | None = None
    input: InputSpec = field(default_factory=InputSpec)
    target_layer: list[str] | None = None
    reshape: str | None = None
    allow_pickle: bool = False
    uri: str | None = None  # where the card was read from (relative paths resolve against it)
    sha256: str = ""
    kind: str = "torch"  # 'torch' | 'onnx' | 'callable' (the last two: black boxes)
    output: str = "logits"  # what a black box returns: 'logits' | 'probs'

    @property
    def black_box(self) -> bool:
        return self.kind != "torch"

    @classmethod
    def from_dict(cls, d: dict, uri: str | None = None, sha256: str = "") -> "ModelCard":
        if not isinstance(d, dict):
            raise ModelCardError("model card must be a mapping")
        kind = d.get("kind") or "torch"
        if kind not in KINDS:
            raise ModelCardError(f"model card kind must be one of {list(KINDS)}, got {kind!r}")
        required = ("name", "num_classes") + (("weights",) if kind == "onnx" else ("arch",))
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ModelCardError(f"model card {uri or ''} misses required keys {missing}".replace("  ", " ")
                                 + (f" (kind {kind})" if kind != "torch" else ""))
        known = {"name", "kind", "arch", "num_classes", "weights", "classes", "input", "target_layer",
                 "reshape", "allow_pickle", "output"}
        unknown = set(d) - known
        if unknown:
            raise ModelCardError(f"model card has unknown keys {sorted(unknown)} (known: {sorted(known)})")
        output = d.get("output") or "logits"
        if output not in OUTPUTS:
            raise ModelCardError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        if kind == "torch" and output != "logits":
            # gradient CAMs and predicted_score take the module's output as logits
            raise ModelCardError("output: probs applies to black-box kinds (onnx, callable); "
                                 "a torch model must return logits")
        if kind != "torch":
            # settings a black box cannot honour are refused rather than silently ignored
            moot = [k for k in ("target_layer", "reshape", "allow_pickle") if d.get(k)]
            moot += ["weights"] if kind == "callable" and d.get("weights") else []
            if moot:
                raise ModelCardError(f"model card kind {kind!r} does not take {moot}: a black box is "
                                     f"reached only through its outputs (methods decam, rise)")
        tl = d.get("target_layer")
        classes = d.get("classes")
        n = int(d["num_classes"])
        if classes is not None and len(classes) != n:
            raise ModelCardError(f"classes lists {len(classes)} names but num_classes is {n}")
        if d.get("reshape") not in (None, "vit", "swin"):
            raise ModelCardError(f"reshape must be 'vit' or 'swin', got {d.get('reshape')!r}")
        return cls(
            name=str(d["name"]), arch=None if d.get("arch") is None else str(d["arch"]), num_classes=n,
            weights=d.get("weights"), classes=[str(c) for c in classes] if classes else None,
            input=InputSpec.from_card(d.get("input")),
            target_layer=[tl] if isinstance(tl, str) else (list(tl) if tl else None),
            reshape=d.get("reshape"), allow_pickle=bool(d.get("allow_pickle", False)),
            uri=uri, sha256=sha256, kind=kind, output=output,
        )

    @classmethod
    def load(cls, uri: str) -> "ModelCard":
        try:
            raw = storage.read_bytes(uri)
        except storage.StorageError as e:
            raise ModelCardError(f"cannot read model card: {e}") from e
        try:
            d = yaml.safe_load(raw.decode("utf-8"))  # YAML is a superset of JSON
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ModelCardError(f"model card {uri} is not valid YAML/JSON: {e}") from e
        return cls.from_dict(d, uri=uri, sha256=hashlib.sha256(raw).hexdigest())

    def weights_uri(self) -> str | None:
        if not self.weights:
            return None
        return storage.resolve(self.uri, self.weights, allow_escape=True) if self.uri else self.weights

    def to_dict(self) -> dict:
        d = {"name": self.name, "arch": self.arch, "num_classes": self.num_classes,
             "classes": self.classes, "weights": self.weights, "input": self.input.to_dict(),
             "target_layer": self.target_layer, "reshape": self.reshape}
        if self.black_box:  # torch cards stay as before, readable by earlier camgate versions
            d.update(kind=self.kind, output=self.output)
        return d


# --- architectures -------------------------------------------------------------------------

def build_arch(arch: str, num_classes: int) -> nn.Module:
    """``torchvision/<name>`` or ``package.module:factory`` -> an uninitialised module."""
    if arch.startswith("torchvision/"):
        import torchvision.models as tvm

        name = arch.split("/", 1)[1]
        if name not in tvm.list_models():
            raise ModelCardError(f"unknown torchvision architecture {name!r}")
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    if ":" not in arch:
        raise ModelCardError(f"arch must be 'torchvision/<name>' or 'package.module:factory', got {arch!r}")
    factory = import_object(arch, "factory", ModelCardError)
    try:
        return factory(num_classes=num_classes)
    except TypeError:  # factories without a num_classes argument
        return factory()


def _last_conv_name(model: nn.Module) -> str:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = name
    if last is None:
        raise ModelCardError("no Conv2d in the model: give target_layer explicitly")
    return last


def default_target_layers(model: nn.Module, arch: str) -> list[str]:
    """The architecture's last convolutional block (what pytorch-grad-cam's docs recommend)."""
    name = arch.split("/")[-1].split(":")[-1].lower()
    names = dict(model.named_modules())
    candidates = [
        (("resnet", "resnext", "wide_resnet", "regnet"), lambda: _last_child("layer4", names) or "trunk_output"),
        (("densenet",), lambda: "features"),
        (("vit_",), lambda: f"{_last_child('encoder.layers', names)}.ln_1"),
        (("swin",), lambda: "features"),
        (("mobilenet", "efficientnet", "mnasnet", "convnext", "vgg", "alexnet", "squeezenet",
          "shufflenet", "googlenet", "inception"), lambda: _last_feature_block(names)),
    ]
    for prefixes, pick in candidates:
        if name.startswith(prefixes):
            layer = pick()
            if layer in names:
                return [layer]
    return [_last_conv_name(model)]


def _last_child(parent: str, names: dict) -> str | None:
    kids = [n for n in names if n.startswith(parent + ".") and n.count(".") == parent.count(".") + 1]
    return kids[-1] if kids else (parent if parent in names else None)


def _last_feature_block(names: dict) -> str | None:
    if "features" in names:
        return _last_child("features", names)
    return None


def resolve_layers(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """Dotted paths -> modules; a wrong path fails with the list of valid candidates."""
    names = dict(model.named_modules())
    out = []
    for p in paths:
        if p not in names or p == "":
            convs = [n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.Sequential)) and n]
            hint = ", ".join(convs[-12:])
            raise ModelCardError(
                f"target layer {p!r} is not a module of this model; candidates (last {min(12, len(convs))}"
                f" of {len(convs)} conv/sequential modules): {hint}")
        out.append(names[p])
    return out


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
                                 f"(heatmaps from outputs only: methods decam, rise)")
        return resolve_layers(self.model, self.target_layers)

    def metadata(self) -> dict:
        md = {"name": self.card.name, "arch": self.card.arch, "num_classes": self.card.num_classes,
              "classes": self.card.classes, "input": self.card.input.to_dict(),
              "target_layer": self.target_layers, "reshape": self.card.reshape,
              "weights_sha256": self.weights_sha256, "card_sha256": self.card.sha256}
        if self.card.black_box:  # absent = torch: torch runs keep their fingerprint (resume across versions)
            md.update(kind=self.card.kind, output=self.card.output)
        return md


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelCardError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def token_reshape(kind: str, grid: tuple[int, int] | None = None) -> Callable:
    """Token layer output -> map (B, C, h, w). Swin's is (B, h, w, C); ViT's is (B, N, C), N = the
    prefix tokens (class token, registers) followed by the h x w patch grid."""
    if kind == "swin":
        return lambda t: t.permute(0, 3, 1, 2)
    h, w = grid

    def vit(t: torch.Tensor) -> torch.Tensor:
        return t[:, t.shape[1] - h * w:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    return vit


def vit_grid(model: nn.Module, n_tokens: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid behind ``n_tokens`` tokens: from the model's own patch size when it states one
    (torchvision ``patch_size``, timm ``patch_embed.patch_size``), else the grid with the input's
    aspect ratio that leaves the fewest prefix tokens."""
    H, W = input_size
    patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if (H // ph) * (W // pw) <= n_tokens:
            return H // ph, W // pw
    for prefix in range(0, 9):
        n = n_tokens - prefix
        h = max(1, round(math.sqrt(n * H / W)))
        if n > 0 and n % h == 0 and abs(h / (n // h) - H / W) < 0.25 * H / W:
            return h, n // h
    raise ModelCardError(f"cannot tell the patch grid of {n_tokens} tokens for a {H}x{W} input")


def _token_kind(arch: str, layers: Sequence[str]) -> str | None:
    """torchvision ViT/Swin target layers emit tokens, not maps: pick the reshape for them."""
    name = arch.split("/")[-1] if arch.startswith("torchvision/") else ""
    if name.startswith("vit_") and all(l.startswith("encoder.") for l in layers):
        return "vit"
    if name.startswith("swin") and all(l.startswith("features") for l in layers):
        return "swin"
    return None


def _dry_forward(model: nn.Module, layers: Sequence[str], device, size) -> tuple[torch.Tensor, dict]:
    """One forward of a zero image with hooks on ``layers``: (output, {layer: [outputs per call]})."""
    seen: dict[str, list] = {name: [] for name in layers}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: seen[n].append(o)) for n in layers]
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *size, device=device))
    finally:
        for h in handles:
            h.remove()
    return out, seen


def spatial_layers(model: nn.Module, device, size) -> list[str]:
    """Modules that run once per forward and output a (B, C, h, w) map: the valid target layers."""
    names = [n for n, _ in model.named_modules() if n]
    _, seen = _dry_forward(model, names, device, size)
    return [n for n in names if len(seen[n]) == 1 and torch.is_tensor(seen[n][0]) and seen[n][0].ndim == 4]


def _check_layers(model: nn.Module, layers: list[str], kind: str | None, device, size):
    """Validate every target layer with one dry forward; -> (the token reshape they need or None, output).

    A layer must run once per forward and give a tensor that is (or reshapes to) a spatial map; any
    other layer would turn every row into an error, so it is refused here, before data is read."""
    out, seen = _dry_forward(model, layers, device, size)

    def refuse(problem: str):
        cands = spatial_layers(model, device, size)
        raise ModelCardError(f"{problem}; candidates (last {min(12, len(cands))} of {len(cands)} modules giving a "
                             f"spatial map once per forward): {', '.join(cands[-12:])}")

    reshape = None
    for name in layers:
        calls = seen[name]
        if len(calls) != 1:
            refuse(f"target layer {name!r} runs {len(calls)} times in one forward, not once")
        a = calls[0]
        if not torch.is_tensor(a):
            refuse(f"target layer {name!r} returns a {type(a).__name__}, not a tensor")
        if kind == "vit" and a.ndim == 3:
            reshape = token_reshape("vit", vit_grid(model, a.shape[1], size))
        elif kind == "swin" and a.ndim == 4:
            reshape = token_reshape("swin")
        elif kind and a.ndim in (3, 4):
            refuse(f"target layer {name!r} gives shape {tuple(a.shape)}, which 'reshape: {kind}' cannot map")
        shaped = reshape(a) if reshape else a
        if shaped.ndim != 4:
            hint = " (token layers need 'reshape: vit' or 'swin' in the model card)" if a.ndim == 3 else ""
            refuse(f"target layer {name!r} gives shape {tuple(a.shape)}, not a spatial map (B, C, h, w){hint}")
    return reshape, out


def load_model(card: ModelCard | str, device: str = "auto", target_layer: Sequence[str] | str | None = None
               ) -> LoadedModel:
    """Build, load weights, freeze, resolve the target layers and check them with one dry forward."""
    if isinstance(card, str):
        card = ModelCard.load(card)
    if card.black_box:
        return _load_black_box(card, device, target_layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a card without weights still gives the same model on every load
        model = build_arch(card.arch, card.num_classes)
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
        layers = card.target_layer or default_target_layers(model, card.arch)
    resolve_layers(model, layers)  # fail now, before any data is read
    dev = pick_device(device)
    model.to(dev)
    kind = card.reshape or _token_kind(card.arch, layers)
    # the dry forward finds every configuration problem now (layer, shape, output), not per batch
    reshape, out = _check_layers(model, list(layers), kind, dev, card.input.size)
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[1] != card.num_classes:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ModelCardError(f"model output has shape {shape}, expected (N, {card.num_classes})")
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
    try:
        backend = load_backend(card.kind, num_classes=card.num_classes, input_size=card.input.size, weights=data,
                               arch=card.arch, output=card.output, device=device)
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
