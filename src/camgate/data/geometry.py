"""Preprocessing geometry: what part of an image the model sees, at what size, and how it is
normalised (:class:`InputSpec`). Model loading, data decoding and report overlays share it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ModelCardError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("stretch", "center_crop")


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

    # Boxes are xyxy in continuous pixel coordinates (edges, not centres): (0, 0, W, H) is the whole image.
    # ``size`` is (width, height) of the original image, as for ``box``. Nothing is clipped: a box partly
    # outside what the model sees (center_crop) maps outside the input / region, so the mappings invert exactly.

    def box_to_input(self, box, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """An xyxy box in original image pixels -> model-input pixels (the crop's offset, then its scale)."""
        left, top, right, bottom = self.box(*size)
        h, w = self.size
        sx, sy = w / (right - left), h / (bottom - top)
        x1, y1, x2, y2 = (float(v) for v in box)
        return ((x1 - left) * sx, (y1 - top) * sy, (x2 - left) * sx, (y2 - top) * sy)

    def box_from_input(self, box, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """An xyxy box in model-input pixels (a detector's output) -> original image pixels."""
        left, top, right, bottom = self.box(*size)
        h, w = self.size
        sx, sy = (right - left) / w, (bottom - top) / h
        x1, y1, x2, y2 = (float(v) for v in box)
        return (left + x1 * sx, top + y1 * sy, left + x2 * sx, top + y2 * sy)

    def box_to_region(self, box, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """An xyxy box in original image pixels -> the pixels of the region the model sees, at original
        resolution (what :func:`camgate.data.decode.model_view` cuts a mask to): minus the crop's offset."""
        left, top, _, _ = self.box(*size)
        x1, y1, x2, y2 = (float(v) for v in box)
        return (x1 - left, y1 - top, x2 - left, y2 - top)

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
