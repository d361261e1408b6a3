"""The model card: parsing and validation (what a card may say, before anything is loaded).

A model card is YAML/JSON (local path or s3://)::

    name: underpass-resnet18
    arch: torchvision/resnet18          # or package.module:factory
    num_classes: 4
    classes: [pedestrian, bike, dog, empty]
    weights: weights.safetensors        # relative -> next to the card
    input: {size: [224, 224], mean: [...], std: [...], resize: stretch}
    target_layer: layer4                # or a list; default per architecture
    reshape: vit                        # token -> map reshape for ViT/Swin layers

Object detectors (torchvision's output convention: per image ``boxes`` xyxy in input pixels,
``labels``, ``scores``; class 0 is background by that convention)::

    task: detection                     # classification (default) | detection
    arch: torchvision/fcos_resnet50_fpn # or package.module:factory; kind onnx|callable: black boxes
    input: {size: [512, 640]}           # the detector normalises inside: mean 0, std 1 by default
    target_layer: backbone.body.layer4  # default: the backbone's last block; an FPN needs reshape: fpn

Semantic segmentation (per-pixel class scores (B, K, H, W); a class's map explains its scores summed
over its region) and multi-label classifiers (independent sigmoid logits (B, K); one map per positive
label)::

    task: segmentation                  # torchvision/fcn_*, deeplabv3_*, lraspp_* or a module:factory
    arch: torchvision/deeplabv3_mobilenet_v3_large
    target_layer: backbone.16           # default: the backbone's last block (backbone.layer4 for ResNets)
    task: multilabel                    # any classifier arch; its (B, K) outputs read as sigmoid logits

Black boxes (heatmaps from outputs only: methods ``decam``, ``rise``; detectors: ``drise``)::

    kind: onnx                          # weights: the .onnx file; no arch, no target_layer
    kind: callable                      # arch: package.module:function, the scoring function itself
    output: probs                       # what the model returns: logits (default) or probs
                                        # (multilabel: sigmoid probabilities; segmentation: per pixel)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import yaml

from ..data.geometry import InputSpec
from ..errors import ModelCardError
from ..io import storage
from .backends import KINDS, OUTPUTS

TASKS = ("classification", "detection", "segmentation", "multilabel")
RESHAPES = ("vit", "swin", "fpn")


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
    task: str = "classification"

    @property
    def detection(self) -> bool:
        return self.task == "detection"

    @property
    def segmentation(self) -> bool:
        return self.task == "segmentation"

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def black_box(self) -> bool:
        return self.kind != "torch"

    @classmethod
    def from_dict(cls, d: dict, uri: str | None = None, sha256: str = "") -> "ModelCard":
        if not isinstance(d, dict):
            raise ModelCardError("model card must be a mapping")
        kind = d.get("kind") or "torch"
        task = d.get("task") or "classification"
        if task not in TASKS:
            raise ModelCardError(f"model card task must be one of {list(TASKS)}, got {task!r}")
        if kind not in KINDS:
            raise ModelCardError(f"model card kind must be one of {list(KINDS)}, got {kind!r}")
        required = ("name", "num_classes") + (("weights",) if kind == "onnx" else ("arch",))
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ModelCardError(f"model card {uri or ''} misses required keys {missing}".replace("  ", " ")
                                 + (f" (kind {kind})" if kind != "torch" else ""))
        known = {"name", "kind", "arch", "num_classes", "weights", "classes", "input", "target_layer",
                 "reshape", "allow_pickle", "output", "task"}
        unknown = set(d) - known
        if unknown:
            raise ModelCardError(f"model card has unknown keys {sorted(unknown)} (known: {sorted(known)})")
        output = d.get("output") or "logits"
        if output not in OUTPUTS:
            raise ModelCardError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        if task == "detection" and d.get("output"):
            raise ModelCardError("output applies to classifiers; a detector returns boxes, labels and scores")
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
                                     f"reached only through its outputs (methods "
                                 f"{'drise' if task == 'detection' else 'decam, rise'})")
        tl = d.get("target_layer")
        classes = d.get("classes")
        n = int(d["num_classes"])
        if classes is not None and len(classes) != n:
            raise ModelCardError(f"classes lists {len(classes)} names but num_classes is {n}")
        if d.get("reshape") not in (None, *RESHAPES):
            raise ModelCardError(f"reshape must be one of {list(RESHAPES)}, got {d.get('reshape')!r}")
        if (d.get("reshape") == "fpn") != (task == "detection") and d.get("reshape"):
            raise ModelCardError(f"reshape {d.get('reshape')!r} does not apply to a {task} model")
        inp = dict(d.get("input") or {})
        if task == "detection":  # detectors take pixels in [0, 1] and normalise inside
            inp.setdefault("mean", (0.0, 0.0, 0.0))
            inp.setdefault("std", (1.0, 1.0, 1.0))
        return cls(
            name=str(d["name"]), arch=None if d.get("arch") is None else str(d["arch"]), num_classes=n,
            weights=d.get("weights"), classes=[str(c) for c in classes] if classes else None,
            input=InputSpec.from_card(inp),
            target_layer=[tl] if isinstance(tl, str) else (list(tl) if tl else None),
            reshape=d.get("reshape"), allow_pickle=bool(d.get("allow_pickle", False)),
            uri=uri, sha256=sha256, kind=kind, output=output, task=task,
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
        if self.task != "classification":  # classifier cards stay as before
            d["task"] = self.task
        return d
