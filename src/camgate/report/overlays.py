"""Heatmap overlays: the model's view of an image beside its map, the invalid region outlined.
The one home of the colour map and the outline, shared with :mod:`.animate`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from . import detection

GALLERY = 12  # worst images shown with their overlays (HTML) or listed (Markdown)


@lru_cache(maxsize=4)
def colormap(name: str = "jet") -> np.ndarray:
    """(256, 3) uint8 lookup table sampled once from a matplotlib colour map."""
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colours(x: np.ndarray, name: str = "jet") -> np.ndarray:
    """Values in [0, 1] -> RGB in [0, 1] from :func:`colormap` (jet: blue = cold, red = hot)."""
    idx = (np.clip(np.asarray(x, dtype=np.float32), 0, 1) * 255).round().astype(np.intp)
    return colormap(name)[idx].astype(np.float32) / 255


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized (nearest, as masks are everywhere) to ``size`` = (H, W)."""
    return np.asarray(Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).resize(
        size[::-1], Image.NEAREST)) > 0


def boundary(m: np.ndarray) -> np.ndarray:
    """Pixels of ``m`` with a 4-neighbour outside it. Edge padding: the picture's own border is no
    border of the region."""
    p = np.pad(m, 1, mode="edge")
    return m & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])


def worst_rows(table: pa.Table, top: int) -> tuple[np.ndarray, list[dict]]:
    """Positions and rows of the ``top`` ok rows by invalid activation ratio, each row with its
    ``row`` (the position if absent). In a detection run a row is one detection: several share a
    ``row``, and :func:`camgate.report.detection.row_key` tells them apart."""
    status = table.column("status").cast(pa.string()).to_numpy(zero_copy_only=False)
    ratio = table.column("invalid_activation_ratio").cast(pa.float64()).to_numpy()
    ok = np.flatnonzero((status == "ok") & ~np.isnan(ratio))
    order = ok[np.argsort(-ratio[ok], kind="stable")][:top]
    # keyed by `row`: image ids repeat (duplicate rows, one stem in two folders)
    return order, [{**r, "row": int(r["row"]) if r.get("row") is not None else int(i)}
                   for i, r in zip(order, table.take(pa.array(order, type=pa.int64())).to_pylist())]


_TINT = np.array([1.0, 0.0, 1.0], dtype=np.float32)  # magenta: in no heatmap colour, rare in photos
_REGION = np.array([0.0, 1.0, 1.0], dtype=np.float32)  # cyan: a segmentation class's region, beside white/black


def _outline(out: np.ndarray, m: np.ndarray) -> None:
    """Draw the border of ``m`` in ``out``: white inside, black outside, visible on any picture.
    Edge padding: the image border itself is no border of the region."""
    out[boundary(m)] = 1.0
    out[boundary(~m)] = 0.0


def box_in_view(det_box, box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box (x1, y1, x2, y2) in original image pixels as the first and last pixel columns and rows
    (inclusive) it covers in a panel of ``size`` = (H, W) showing the crop ``box`` of the image
    (:meth:`camgate.data.geometry.InputSpec.box`). Parts outside the crop fall outside the panel."""
    left, top, right, bottom = box
    sx, sy = size[1] / max(1, right - left), size[0] / max(1, bottom - top)
    x1, y1, x2, y2 = det_box
    return (int(np.floor((x1 - left) * sx)), int(np.floor((y1 - top) * sy)),
            int(np.ceil((x2 - left) * sx)) - 1, int(np.ceil((y2 - top) * sy)) - 1)


def _draw_box(out: np.ndarray, rect: tuple[int, int, int, int]) -> None:
    """Draw a rectangle (inclusive pixel columns/rows x1, y1, x2, y2) in ``out``: a white line 2 px wide
    on its edge, black just outside it, visible on any picture. Sides outside ``out`` are not drawn."""
    h, w = out.shape[:2]
    x1, y1, x2, y2 = rect
    if x2 < x1 or y2 < y1 or x2 < 0 or y2 < 0 or x1 >= w or y1 >= h:
        return

    def line(y0, y1_, x0, x1_, v):
        ys, ye, xs, xe = max(y0, 0), min(y1_, h - 1), max(x0, 0), min(x1_, w - 1)
        if ys <= ye and xs <= xe:
            out[ys:ye + 1, xs:xe + 1] = v

    for k, v in ((-1, 0.0), (0, 1.0), (1, 1.0)):  # outside black, then the 2 px white edge
        for y in (y1 + k, y2 - k):
            if 0 <= y < h:
                line(y, y, x1 + k, x2 - k, v)
        for x in (x1 + k, x2 - k):
            if 0 <= x < w:
                line(y1 + k, y2 - k, x, x, v)


@lru_cache(maxsize=None)
def font(size: int = 10):
    """Pillow's default font at ``size`` px (captions here, titles in the animations)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _caption(pic: Image.Image, text: str, rect: tuple[int, int, int, int], right: int) -> None:
    """White text on black by the box's left corner: above it, else below it, else inside its top
    (where the box fills the panel's height); kept within the first panel (x < ``right``)."""
    draw = ImageDraw.Draw(pic)
    left, top, r, bottom = draw.textbbox((0, 0), text, font=font())
    tw, th = r - left + 4, bottom - top + 2
    x = min(max(rect[0], 0), max(0, right - tw))
    if rect[1] - 1 - th >= 0:
        y = rect[1] - 1 - th
    elif rect[3] + 2 + th <= pic.height:
        y = rect[3] + 2
    else:
        y = max(rect[1], 0) + 2
    draw.rectangle((x, y, min(x + tw, right) - 1, y + th - 1), fill=(0, 0, 0))
    draw.text((x + 2 - left, y + 1 - top), text, fill=(255, 255, 255), font=font())


def overlay_png(image: bytes, cam: np.ndarray, box: tuple[int, int, int, int], mask=None,
                width: int = 160, det_box=None, caption: str | None = None, region=None) -> bytes:
    """PNG of two panels, each fitted into ``width`` × ``width``: the model's view of ``image``
    (``box``) and the heatmap blended into it, both with the invalid region (``mask``: bool array of
    the box) outlined, and tinted in the first. 256 colours: a third of the bytes of full colour, and
    the outline stays sharp (JPEG would blur it), so a gallery stays small however large the images.

    ``det_box``: a detection's box (x1, y1, x2, y2) in original image pixels, drawn over both panels
    (white 2 px with a black edge), with ``caption`` (label, score) by it in the first. ``region``: a
    segmentation class's region (bool array of the model's view, any resolution), outlined in cyan
    over both panels, with ``caption`` by its top left corner."""
    import io

    import torch

    from ..cam import normalized
    from ..data.decode import decode_image

    img = decode_image(image, "overlay").crop(box)
    w, h = img.size
    scale = width / max(w, h)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    base = np.asarray(img.resize(size[::-1], Image.BILINEAR), dtype=np.float32) / 255
    heat = normalized(torch.from_numpy(cam)[None].float(), size)[0].numpy()
    panels = [base.copy(), 0.55 * base + 0.45 * colours(heat)]
    if mask is not None:
        m = resized_mask(mask, size)
        panels[0][m] = 0.7 * panels[0][m] + 0.3 * _TINT  # which side of the outline is invalid
        for panel in panels:
            _outline(panel, m)
    rect = box_in_view(det_box, box, size) if det_box is not None else None
    if rect is not None:
        for panel in panels:
            _draw_box(panel, rect)
    if region is not None:
        r = resized_mask(region, size)
        for panel in panels:
            panel[boundary(~r)] = 0.0
            panel[boundary(r)] = _REGION
        ys, xs = np.nonzero(r)
        if len(ys):
            rect = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    gap = np.ones((size[0], 4, 3), dtype=np.float32)
    out = np.concatenate([panels[0], gap, panels[1]], axis=1)
    buf = io.BytesIO()
    pic = Image.fromarray((out * 255).round().astype(np.uint8))
    if rect is not None and caption:
        _caption(pic, caption, rect, size[1])
    pic = pic.quantize(256, Image.Quantize.FASTOCTREE)
    pic.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


_OVERLAY_COLUMNS = ["row", "image_id", "status", "invalid_activation_ratio", "invalid_area_ratio", "peak_in_invalid",
                    "predicted_label", "predicted_class", "label", "image", "mask", "cam", "cam_height",
                    "cam_width", "image_width", "image_height", "target_class", "predicted_score",
                    *detection.COLUMNS]


def overlays(results_uri: str, top: int = GALLERY) -> dict:
    """PNG overlays for the ``top`` images by invalid activation ratio, by ``row`` (what ``html`` embeds);
    in a detection run by ``(row, det_index)``, each with the detection's box and caption drawn; in a
    segmentation or multi-label run by ``(row, 'class', target_class)``, a segmentation class's region
    outlined.

    An image that cannot be read any more is left out: the report still renders."""
    from ..data.decode import MaskSpec, decode_mask, model_view
    from ..data.geometry import InputSpec
    from ..io import results as res
    from ..io import storage

    pf = res.open_file(results_uri)
    # rank on the light columns, then read the maps of the chosen rows only
    light = pf.read(columns=[c for c in _OVERLAY_COLUMNS if c in pf.schema_arrow.names and c != "cam"])
    md = res.run_metadata(pf.schema_arrow)
    spec = InputSpec.from_card(md.get("model", {}).get("input"))
    mask_spec = MaskSpec.from_dict(md.get("mask_spec"))
    out: dict = {}
    per_class = detection.per_class_task(md)
    positions, worst = worst_rows(light, top)
    maps = [c for c in ("cam", "cam_height", "cam_width", "region", "region_height", "region_width")
            if c in pf.schema_arrow.names]
    cams = pf.read(columns=maps).take(pa.array(positions, type=pa.int64())).to_pylist()
    for row, cam in zip(worst, cams):
        try:
            size = (row["image_width"], row["image_height"])
            mask = None
            if row.get("mask"):
                mask = model_view(decode_mask(storage.read_bytes(row["mask"]), row["mask"], mask_spec, size),
                                  spec, size)
            det_box = detection.box_of(row)
            region = res.region_array(cam) if per_class else None
            out[detection.row_key(row, per_class)] = overlay_png(
                storage.read_bytes(row["image"]), res.cam_array(cam), spec.box(*size), mask, det_box=det_box,
                caption=detection.caption(row) if (det_box or region is not None) else None, region=region)
        except (storage.StorageError, ValueError, TypeError):
            continue  # the image moved or the row has no map: the report goes without this picture
    return out
