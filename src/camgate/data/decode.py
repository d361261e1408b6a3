"""Item -> sample: image and mask decoding, the static mask, and the model's view of a mask.

A problem with one item (unreadable, too large, wrong size) ends up in ``Sample.error`` so the run
goes on; masks are resized to the image with nearest-neighbour and cut to the region the model sees.
"""
from __future__ import annotations

import io
import os
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError
from ..io import storage
from .geometry import InputSpec
from .manifest import DataError, Item

DEFAULT_MAX_PIXELS = 10_000 * 10_000


@dataclass(frozen=True)
class MaskSpec:
    """How mask pixels map to 'invalid'.

    Default: non-zero (in any colour channel) = invalid. ``invalid_ids``: the mask is a label map and
    pixels whose raw value (palette index for 'P' images) is in the list are invalid. ``invert``
    flips the result, i.e. the mask (or the listed ids) marks the valid region.
    """

    invert: bool = False
    invalid_ids: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, invert: bool = False, invalid_ids: str | None = "") -> "MaskSpec":
        """From user text: ``invalid_ids`` is a comma-separated list ('' = any non-zero pixel is invalid)."""
        ids = [s.strip() for s in str(invalid_ids or "").split(",") if s.strip()]
        try:
            parsed = tuple(int(s) for s in ids) or None
        except ValueError:
            raise ConfigError(f"invalid_ids must be comma-separated integers, got {invalid_ids!r}") from None
        return cls(invert=bool(invert), invalid_ids=parsed)

    def to_dict(self) -> dict:
        return {"invert": self.invert, "invalid_ids": list(self.invalid_ids or [])}

    @classmethod
    def from_dict(cls, d: dict | None) -> "MaskSpec":
        d = d or {}
        return cls(bool(d.get("invert")), tuple(d["invalid_ids"]) if d.get("invalid_ids") else None)


@dataclass
class Sample:
    """A decoded item. ``error`` set => ``x`` and ``mask`` are None and the caller writes an error row.

    ``x``: model input (C, H, W) float32. ``mask``: bool (h_box, w_box), the invalid pixels of the
    image region the model sees, at original resolution; None when the item has no mask.
    """

    item: Item
    x: torch.Tensor | None
    mask: torch.Tensor | None
    error: str | None
    size: tuple[int, int] | None = None  # original image (width, height)
    error_kind: str | None = None  # 'input' | 'storage' (see camgate.io.results.ERROR_KINDS)
    raw: torch.Tensor | None = None  # JPEG bytes left for the GPU to decode (then ``x`` is None)
    # sha256 of the bytes read for this item (the run identity's data fingerprint folds them in)
    image_sha256: str | None = None
    mask_sha256: str | None = None


# --- decoding --------------------------------------------------------------------------------

def max_pixels() -> int:
    try:
        return int(float(os.environ.get("CAMGATE_MAX_PIXELS", DEFAULT_MAX_PIXELS)))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def _open(data: bytes, load: bool = True) -> Image.Image:
    """Bytes -> fully decoded PIL image (first frame), or ValueError saying what is wrong.
    ``load=False`` checks the header only (size, bomb limit) and leaves the pixels undecoded."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    limit = max_pixels()
    # PIL's own bomb check reads this module global; keep it in line with ours so a larger
    # CAMGATE_MAX_PIXELS is honoured and a smaller one already stops PIL
    Image.MAX_IMAGE_PIXELS = limit
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb refused ({e}; limit CAMGATE_MAX_PIXELS={limit})") from e
    except UnidentifiedImageError as e:
        raise ValueError("not a recognised image format") from e
    except Exception as e:  # noqa: BLE001 - plugins raise SyntaxError/OSError/struct.error on bad headers
        raise ValueError(f"corrupt image header ({e})") from e
    w, h = img.size
    # checked here too: PIL only warns between 1x and 2x its limit, and filters may hide the warning
    if w * h > limit:
        raise ValueError(f"decompression bomb refused: {w}x{h} = {w * h} pixels exceeds the limit of "
                         f"{limit} (CAMGATE_MAX_PIXELS)")
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}x{h})")
    if not load:
        return img
    try:
        img.load()  # force the full decode: Image.open only reads the header
    except (OSError, SyntaxError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"truncated or corrupt image ({e})") from e
    return img


def decode_image(data: bytes, name: str) -> Image.Image:
    """Bytes -> RGB PIL image. Alpha is dropped (not composited); 16-bit/32-bit grey is scaled to 8 bit."""
    img = _open(data)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) / 257.0  # 0..65535 -> 0..255
    elif mode == "I":
        # PIL decodes 16-bit PNG/TIFF grey into 32-bit 'I'; treat it as a 16-bit container
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
    elif mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        a = a * 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else np.clip(a, 0, 255)
    else:
        if mode == "PA" or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # PIL refuses P+transparency -> RGB without a warning
        return img.convert("RGB")
    return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")


def decode_mask(data: bytes, name: str, spec: MaskSpec, size: tuple[int, int]) -> np.ndarray:
    """Bytes -> bool (h, w) invalid-pixel mask at image ``size`` = (w, h), resized with NEAREST."""
    img = _open(data)
    mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        img = img.convert({"RGBA": "RGB", "LA": "L", "PA": "P"}[mode])  # alpha is not mask content
    elif mode not in ("1", "L", "P", "I", "F", "RGB") and not mode.startswith("I;16"):
        img = img.convert("RGB")  # CMYK, YCbCr, ...
    a = np.asarray(img)
    if a.ndim == 3:
        if spec.invalid_ids is not None:
            if not (a == a[..., :1]).all():
                raise ValueError(f"label-map mask needs one channel, got a colour {img.mode} image")
            a = a[..., 0]
        else:
            a = a.any(axis=2)
    if spec.invalid_ids is not None:
        invalid = np.isin(a, np.asarray(spec.invalid_ids))
    else:
        invalid = a != 0
    if spec.invert:
        invalid = ~invalid
    if (invalid.shape[1], invalid.shape[0]) != tuple(size):
        invalid = np.asarray(Image.fromarray(invalid.astype(np.uint8)).resize(tuple(size), Image.NEAREST)) != 0
    return invalid


VOID = 255  # a label map's pixels of no class (the VOC convention)


def decode_label_map(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Bytes -> int64 (h, w) class ids of a ground-truth label map (raw values: palette index for 'P'
    images; :data:`VOID` = no class). It must be the size of its image, ``size`` = (w, h): a label map is
    not resized to its image (a stretched class boundary would be a wrong ground truth). ValueError
    saying what is wrong."""
    img = _open(data)
    if img.mode in ("LA", "PA", "RGBA"):
        img = img.convert({"LA": "L", "PA": "P", "RGBA": "RGB"}[img.mode])  # alpha is not a class
    if img.mode not in ("1", "L", "P", "I", "RGB") and not img.mode.startswith("I;16"):
        raise ValueError(f"a label map holds integer class ids (mode L, P, I or I;16), got mode {img.mode}")
    a = np.asarray(img)
    if a.ndim == 3:
        if not (a == a[..., :1]).all():
            raise ValueError(f"a label map holds one class id per pixel, got a colour {img.mode} image")
        a = a[..., 0]
    if (a.shape[1], a.shape[0]) != tuple(size):
        raise ValueError(f"the label map is {a.shape[1]}x{a.shape[0]} pixels, its image {size[0]}x{size[1]}")
    return a.astype(np.int64)


class StaticMask:
    """One mask for every item: read once, decoded once per image size (thread-safe)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._lock = threading.RLock()
        self._raw: bytes | None = None
        self._sha256: str | None = None
        self._decoded: dict[tuple, np.ndarray] = {}

    def raw(self) -> bytes:
        with self._lock:
            if self._raw is None:
                self._raw = storage.read_bytes(self.uri)
            return self._raw

    def sha256(self) -> str:
        """sha256 of the mask's bytes, hashed once."""
        with self._lock:
            if self._sha256 is None:
                self._sha256 = storage.sha256_bytes(self.raw())
            return self._sha256

    def get(self, spec: MaskSpec, size: tuple[int, int]) -> np.ndarray:
        key = (spec, tuple(size))
        with self._lock:  # held while decoding: a new size is decoded once, not once per worker
            hit = self._decoded.get(key)
            if hit is None:
                hit = decode_mask(self.raw(), self.uri, spec, size)
                hit.setflags(write=False)  # shared between samples
                self._decoded[key] = hit
            return hit

    def check(self, spec: MaskSpec) -> None:
        """Fail the run early (DataError) if the static mask cannot be read or decoded."""
        try:
            self.get(spec, _open(self.raw()).size)  # decoded at its own size, cached like any other
        except (storage.StorageError, ValueError) as e:
            raise DataError(f"static mask {self.uri}: {e}") from e


def model_view(mask: np.ndarray, input_spec: InputSpec, size: tuple[int, int]) -> np.ndarray:
    """The part of an image-size mask the model sees (``input_spec.box``), as its own copy:
    cached static masks are read-only and shared between samples."""
    left, top, right, bottom = input_spec.box(*size)
    return mask[top:bottom, left:right].copy()


def load_sample(item: Item, input_spec: InputSpec, mask_spec: MaskSpec,
                static_mask: str | StaticMask | None = None, with_mask: bool = True,
                defer_jpeg: bool = False) -> Sample:
    """Fetch + decode one item. Never raises: problems come back as ``Sample.error`` naming the item.

    ``with_mask=False`` (heatmaps only) leaves the item's mask unread: it is analysed later.
    ``defer_jpeg``: a colour or grey JPEG is only checked (header, size limit) and handed on as
    ``Sample.raw`` for the GPU to decode (:mod:`camgate.data.device`); other images decode here."""
    if item.error:
        return Sample(item, None, None, item.error, error_kind="input")
    what, uri = "image", item.image
    try:
        data = storage.read_bytes(uri)
        image_sha, mask_sha = storage.sha256_bytes(data), None
        raw, x = None, None
        if defer_jpeg and data[:3] == b"\xff\xd8\xff":
            img = _open(data, load=False)
            if img.format == "JPEG" and img.mode in ("RGB", "L"):  # what nvJPEG decodes to RGB (not CMYK)
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if raw is None:
            img = decode_image(data, uri)
            x = input_spec.image_tensor(img)
        mask = None
        if not with_mask:
            full = None
        elif static_mask is not None:
            what, uri = "mask", static_mask.uri if isinstance(static_mask, StaticMask) else static_mask
            sm = static_mask if isinstance(static_mask, StaticMask) else StaticMask(static_mask)
            full, mask_sha = sm.get(mask_spec, img.size), sm.sha256()
        elif item.mask:
            what, uri = "mask", item.mask
            mask_bytes = storage.read_bytes(uri)
            full, mask_sha = decode_mask(mask_bytes, uri, mask_spec, img.size), storage.sha256_bytes(mask_bytes)
        else:
            full = None
        if full is not None:
            mask = torch.from_numpy(model_view(full, input_spec, img.size))
        return Sample(item, x, mask, None, img.size, raw=raw, image_sha256=image_sha, mask_sha256=mask_sha)
    except (storage.StorageError, ValueError) as e:  # both already say what went wrong
        problem, kind = str(e), storage_error_kind(e)
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the run
        problem, kind = f"{type(e).__name__}: {e}", "input"
    return Sample(item, None, None, f"{what} {uri} (id {item.image_id}): {problem}", error_kind=kind)


def decode_deferred(sample: Sample, input_spec: InputSpec) -> None:
    """A deferred JPEG the GPU could not decode: decode it here, or make it the item's error."""
    item = sample.item
    try:
        sample.x = input_spec.image_tensor(decode_image(sample.raw.numpy().tobytes(), item.image))
    except ValueError as e:
        sample.x, sample.mask, sample.error, sample.error_kind = None, None, \
            f"image {item.image} (id {item.image_id}): {e}", "input"
    sample.raw = None


def storage_error_kind(e: Exception) -> str:
    """'storage' for a failure of the storage service (worth retrying later), else 'input'."""
    return "storage" if isinstance(e, storage.StorageError) and not isinstance(e, storage.NotFound) else "input"
