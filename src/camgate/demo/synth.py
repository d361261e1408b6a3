"""Deterministic synthetic "underpass" data set: a tunnel seen from a fixed CCTV camera.

The floor/walkway is the VALID region; walls, ceiling and the far opening are INVALID. Every
image shows one of ``CLASSES`` standing on the floor (``empty``: nothing), plus lane markings,
floor clutter and a coloured wall/ceiling lamp. The two variants differ only in that lamp:

- ``clean``: the lamp colour is random, independent of the class;
- ``shortcut``: the lamp colour encodes the class (train and test), so a classifier can be right
  by looking at the wall instead of the object: the shortcut a heatmap gate must catch.

All other random draws are shared between the variants (same seed -> same scenes), so the two
data sets differ in the lamp colour and nothing else.

Layout written by :func:`generate`::

    out_dir/images/{split}_{i:05d}.png
    out_dir/masks/{split}_{i:05d}.png      non-zero = invalid pixel (same geometry for all images)
    out_dir/static_mask.png                the fixed camera's mask, once
    out_dir/train.csv, out_dir/test.csv    columns image,mask,label,split,variant (paths relative)

``generate(..., boxes=True)`` (the detection variant) writes the same images with a ``boxes`` column
(:data:`DETECTION_COLUMNS`): the object's ground-truth box as JSON, ``[]`` for ``empty``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("pedestrian", "bike", "dog", "empty")
VARIANTS = ("clean", "shortcut")
DEFAULT_SIZE = (128, 160)  # (height, width): 8x10 cells at stride 16 (resnet layer3)
# Bump when the rendering changes, so cached data sets and models are regenerated.
SYNTH_VERSION = 2
MANIFEST_COLUMNS = ("image", "mask", "label", "split", "variant")
DETECTION_COLUMNS = ("image", "mask", "boxes", "label", "split", "variant")

# Scene geometry in image fractions (x, y). The floor is a trapezoid converging on the far
# opening; everything else is wall, ceiling or opening. Invalid share ~0.51.
FLOOR = ((0.04, 1.0), (0.96, 1.0), (0.62, 0.18), (0.36, 0.18))
OPENING = ((0.36, 0.08), (0.62, 0.08), (0.62, 0.18), (0.36, 0.18))
LEFT_WALL = ((0.0, 0.22), (0.36, 0.08), (0.36, 0.18), (0.04, 1.0), (0.0, 1.0))
RIGHT_WALL = ((1.0, 0.22), (0.62, 0.08), (0.62, 0.18), (0.96, 1.0), (1.0, 1.0))

# Lamp colours: four well separated hues. Shortcut: lamp colour = class index.
LAMP_COLOURS = np.array([(1.0, 0.15, 0.1), (0.1, 1.0, 0.2), (0.15, 0.35, 1.0), (1.0, 0.9, 0.1)])

CUE_STRENGTH = 0.6  # peak opacity of the lamp's coloured light on the wall
HALO = 3.0  # halo sigma in lamp radii

_SS = 2  # supersampling factor for the scene and objects (smooth edges at low resolution)


def _poly(points, w: int, h: int, scale: int = 1) -> list[tuple[float, float]]:
    return [(x * w * scale, y * h * scale) for x, y in points]


def _region(points, w: int, h: int, scale: int = 1) -> np.ndarray:
    im = Image.new("L", (w * scale, h * scale), 0)
    ImageDraw.Draw(im).polygon(_poly(points, w, h, scale), fill=255)
    return np.asarray(im) > 0


def invalid_mask(size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """uint8 (H, W) mask of the fixed camera: 255 = invalid (not floor), 0 = valid floor."""
    h, w = size
    return np.where(_region(FLOOR, w, h), 0, 255).astype(np.uint8)


# --- objects ---------------------------------------------------------------------------------
# Each draws a silhouette on an RGBA layer standing at foot point (x, y) with height unit u
# (pixels, already supersampled); `d` = +1/-1 facing direction.

def _pedestrian(dr: ImageDraw.ImageDraw, x, y, u, d, col):
    h = 1.0 * u
    w = 0.26 * h
    skin = (225, 190, 160, 255)
    leg = tuple(int(c * 0.6) for c in col[:3]) + (255,)
    gap = 0.05 * h
    dr.rectangle([x - w / 2 + 0.03 * h, y - 0.48 * h, x - gap, y], fill=leg)
    dr.rectangle([x + gap, y - 0.48 * h, x + w / 2 - 0.03 * h, y], fill=leg)
    dr.rounded_rectangle([x - w / 2, y - 0.84 * h, x + w / 2, y - 0.44 * h], radius=0.06 * h, fill=col)
    dr.rectangle([x - w / 2 - 0.06 * h, y - 0.80 * h, x - w / 2, y - 0.50 * h], fill=col)  # arms
    dr.rectangle([x + w / 2, y - 0.80 * h, x + w / 2 + 0.06 * h, y - 0.50 * h], fill=col)
    r = 0.08 * h
    dr.ellipse([x - r, y - 0.84 * h - 2 * r, x + r, y - 0.84 * h], fill=skin)


def _bike(dr, x, y, u, d, col):
    r = 0.2 * u  # wheel radius
    sp = 0.62 * u  # wheel spacing
    t = max(2, int(0.05 * u))
    tyre = (25, 25, 25, 255)
    cx0, cx1, cy = x - sp / 2, x + sp / 2, y - r
    for cx in (cx0, cx1):
        dr.ellipse([cx - r, cy - r, cx + r, cy + r], outline=tyre, width=t)
    seat = (x - d * 0.12 * u, cy - 0.45 * u)
    crank = (x, cy)
    head = (x + d * 0.22 * u, cy - 0.48 * u)
    rear, front = (x - d * sp / 2, cy), (x + d * sp / 2, cy)
    for a, b in ((rear, crank), (crank, seat), (seat, rear), (seat, head), (crank, head), (head, front)):
        dr.line([a, b], fill=col, width=t)
    dr.line([(head[0] - d * 0.06 * u, head[1] - 0.08 * u), (head[0] + d * 0.08 * u, head[1] - 0.08 * u)],
            fill=tyre, width=t)
    dr.line([(seat[0] - 0.08 * u, seat[1]), (seat[0] + 0.08 * u, seat[1])], fill=tyre, width=t + 1)


def _dog(dr, x, y, u, d, col):
    bl, bh = 0.62 * u, 0.22 * u  # body
    top = y - 0.5 * u
    leg = max(2, int(0.07 * u))
    for fx in (-0.38, -0.2, 0.2, 0.38):
        lx = x + fx * bl
        dr.rectangle([lx - leg / 2, top + bh * 0.5, lx + leg / 2, y], fill=col)
    dr.ellipse([x - bl / 2, top, x + bl / 2, top + bh], fill=col)
    hx = x + d * (bl / 2 + 0.02 * u)
    hr = 0.13 * u
    dr.ellipse([hx - hr, top - 0.17 * u, hx + hr, top - 0.17 * u + 2 * hr], fill=col)  # head
    sx = hx + d * 0.12 * u
    dr.ellipse([sx - 0.08 * u, top - 0.06 * u, sx + 0.08 * u, top + 0.06 * u], fill=col)  # snout
    ex = hx - d * 0.06 * u
    dr.polygon([(ex - 0.05 * u, top - 0.12 * u), (ex + 0.05 * u, top - 0.12 * u), (ex, top - 0.3 * u)], fill=col)
    tx = x - d * bl / 2
    dr.line([(tx, top + 0.05 * u), (tx - d * 0.2 * u, top - 0.2 * u)], fill=col, width=leg)


# name -> (drawer, height unit as a fraction of image height at perspective scale 1)
_OBJECTS = {"pedestrian": (_pedestrian, 0.50), "bike": (_bike, 0.55), "dog": (_dog, 0.48)}


def _object_colour(rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random clothing/fur colour, either clearly darker or clearly lighter than the floor."""
    hue = rng.random()
    sat = rng.uniform(0.2, 0.9)
    val = rng.uniform(0.05, 0.25) if rng.random() < 0.5 else rng.uniform(0.7, 0.95)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return tuple(int(c * 255) for c in rgb) + (255,)


# --- one image -------------------------------------------------------------------------------

def render(label: int, variant: str, rng: np.random.Generator,
           size: tuple[int, int] = DEFAULT_SIZE, return_box: bool = False, return_mask: bool = False):
    """One uint8 (H, W, 3) image of class ``label``. Consumes ``rng`` identically for both variants.

    ``return_box=True``: return ``(image, box)`` instead, the same image and rng consumption, with
    ``box`` the object's bounding box (x1, y1, x2, y2) in output pixels as floats: the pixel edges
    around every output pixel the object's silhouette touches (its floor shadow excluded), so the
    object covers columns x1 .. x2-1 and rows y1 .. y2-1; None for ``empty``.

    ``return_mask=True``: the object's silhouette as a uint8 (H, W) label map is appended to the
    result (``(image, mask)``, or ``(image, box, mask)`` with both keywords), again with the same image
    and rng consumption: ``label + 1`` on every output pixel the silhouette touches (shadow excluded;
    its bounding box is ``box``), 0 elsewhere; all 0 for ``empty``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    h, w = size
    H, W = h * _SS, w * _SS
    invalid = invalid_mask(size) > 0
    floor = _region(FLOOR, w, h, _SS)
    lwall, rwall = _region(LEFT_WALL, w, h, _SS), _region(RIGHT_WALL, w, h, _SS)
    opening = _region(OPENING, w, h, _SS)

    # Concrete: grey base with vertical formwork stripes on the walls, mottled floor.
    img = np.empty((H, W, 3), np.float32)
    img[:] = rng.uniform(0.72, 0.85)  # ceiling
    wall_tone = rng.uniform(0.5, 0.65)
    stripes = np.repeat(rng.normal(0, 0.05, (W + _SS * 4) // (_SS * 4) + 1), _SS * 4)[:W]
    wall = wall_tone + stripes[None, :] + rng.normal(0, 0.02, (H, 1))
    img[lwall | rwall] = np.repeat(wall[..., None], 3, axis=2)[lwall | rwall]
    img[opening] = (0.82, 0.9, 0.8)  # daylight at the far end
    ftone = rng.uniform(0.3, 0.45)
    blotch = np.asarray(Image.fromarray(rng.normal(0, 1, (8, 10)).astype(np.float32)).resize((W, H), Image.BICUBIC))
    img[floor] = (ftone + 0.03 * blotch[floor])[:, None]

    # Floor clutter (stains, litter) on every image so "empty" is not just "nothing drawn".
    layer = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    dr = ImageDraw.Draw(layer, "RGBA")
    # Painted lane markings (a kerb line and a dashed centre line, as in the real underpass): the
    # most salient thing present in every scene lies on the floor, so a model that needs some
    # always-present evidence for "empty" finds it there rather than on the wall.
    paint = (235, 235, 225, int(rng.uniform(150, 230)))
    for (x0, x1), dashed in (((0.56, 0.80), False), ((0.49, 0.50), True)):
        for t0 in np.arange(0, 1, 0.1 if dashed else 1.0):
            t1 = t0 + (0.06 if dashed else 1.0)
            y0, y1 = FLOOR[2][1] + t0 * (1 - FLOOR[2][1]), FLOOR[2][1] + t1 * (1 - FLOOR[2][1])
            dr.line([((x0 + t0 * (x1 - x0)) * W, y0 * H), ((x0 + t1 * (x1 - x0)) * W, y1 * H)],
                    fill=paint, width=max(1, round(_SS * (0.5 + 2.5 * t0))))
    for _ in range(rng.integers(1, 5)):
        cy = rng.uniform(0.35, 0.98) * H
        half = _floor_halfwidth(cy / H) * W
        cx = W / 2 + rng.uniform(-0.9, 0.9) * half
        rx, ry = rng.uniform(0.02, 0.08) * W, rng.uniform(0.01, 0.03) * H
        g = int(rng.uniform(40, 120))
        dr.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(g, g, g, int(rng.uniform(60, 140))))
    for _ in range(rng.integers(0, 3)):
        cy = rng.uniform(0.4, 0.98) * H
        cx = W / 2 + rng.uniform(-0.85, 0.85) * _floor_halfwidth(cy / H) * W
        s = rng.uniform(0.01, 0.025) * W
        dr.rectangle([cx - s, cy - s / 2, cx + s, cy + s / 2], fill=_object_colour(rng))

    # The object: perspective scale grows towards the camera; retry until it lies on the floor.
    name = CLASSES[label]
    colour = _object_colour(rng)
    facing = 1 if rng.random() < 0.5 else -1
    draws = rng.random((64, 3))  # fixed budget of placement draws keeps the rng stream aligned
    box, silhouette = None, np.zeros((h, w), np.uint8)
    if name in _OBJECTS:
        drawer, unit = _OBJECTS[name]
        for fy, fx, fs in draws:
            y = (0.55 + 0.43 * fy) * H
            p = (y / H - FLOOR[2][1]) / (1 - FLOOR[2][1])  # 0 at the far end, 1 at the bottom
            u = unit * H * p * (0.85 + 0.3 * fs)
            x = W / 2 + (2 * fx - 1) * _floor_halfwidth(y / H) * W
            obj = Image.new("RGBA", (W, H))
            od = ImageDraw.Draw(obj)
            od.ellipse([x - 0.4 * u, y - 0.04 * u, x + 0.4 * u, y + 0.04 * u], fill=(0, 0, 0, 70))  # shadow
            drawer(od, x, y, u, facing, colour)
            # Checked at output resolution: no output pixel touched by the object is invalid.
            alpha = (np.asarray(obj)[..., 3] > 0).reshape(h, _SS, w, _SS).any(axis=(1, 3))
            if not invalid[alpha].any():
                layer.paste(obj, (0, 0), obj)
                if return_box or return_mask:  # the silhouette alone, drawn again (no rng): no shadow
                    sil = Image.new("RGBA", (W, H))
                    drawer(ImageDraw.Draw(sil), x, y, u, facing, colour)
                    covered = (np.asarray(sil)[..., 3] > 0).reshape(h, _SS, w, _SS).any(axis=(1, 3))
                    box = _bbox(covered)
                    silhouette[covered] = label + 1
                break
        else:  # pragma: no cover - the draw budget is far larger than ever needed
            raise RuntimeError("could not place the object on the floor")

    img = np.asarray(layer.resize((w, h), Image.BOX), dtype=np.float32) / 255.0

    # Lamp on a wall or the ceiling: saturated core + halo, kept strictly inside the invalid region.
    lamp_draw = int(rng.integers(len(CLASSES)))
    lamp = LAMP_COLOURS[label if variant == "shortcut" else lamp_draw]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    r = rng.uniform(0.035, 0.05) * h
    for cy, cx in rng.random((64, 2)) * (h, w):
        d2 = (ys - cy) ** 2 + (xs - cx) ** 2
        if invalid[d2 <= (2 * r) ** 2].all():  # the lamp itself sits on the wall/ceiling
            break
    # The light spills over a wide patch of wall (never onto the floor): a spatially large cue.
    halo = CUE_STRENGTH * np.exp(-d2 / (2 * (HALO * r) ** 2))[..., None]
    core = (d2 <= r * r)[..., None]
    lit = img * (1 - halo) + halo * lamp
    lit = np.where(core, 0.6 * lamp + 0.4, lit)
    img = np.where(invalid[..., None], lit, img)

    # Camera: global exposure, a horizontal light gradient, slight colour cast, sensor noise.
    gain = rng.uniform(0.75, 1.2)
    grad = 1 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    cast = 1 + rng.uniform(-0.04, 0.04, 3)
    img = img * gain * grad * cast + rng.normal(0, 0.02, img.shape)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if not (return_box or return_mask):
        return out
    return (out,) + ((box,) if return_box else ()) + ((silhouette,) if return_mask else ())


def _bbox(covered: np.ndarray) -> tuple[float, float, float, float]:
    """(H, W) bool -> xyxy pixel edges around the True pixels."""
    rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _floor_halfwidth(fy: float) -> float:
    """Half width of the floor (image fraction) at height ``fy`` (image fraction)."""
    (xl0, y0), (xr0, _), (xr1, y1), (xl1, _) = FLOOR
    t = (fy - y1) / (y0 - y1)
    return ((xr1 + t * (xr0 - xr1)) - (xl1 + t * (xl0 - xl1))) / 2


# --- data set --------------------------------------------------------------------------------

def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced labels (counts differ by at most one) in a seeded random order."""
    return rng.permutation(np.arange(n) % len(CLASSES))


def generate(out_dir, variant: str, n_train: int, n_test: int, seed: int = 0,
             size: tuple[int, int] = DEFAULT_SIZE, boxes: bool = False) -> Path:
    """Write the data set to ``out_dir`` and return the path of its test manifest (``test.csv``).

    ``train.csv`` lies next to it. Same arguments -> byte-identical files. ``boxes=True``: the same
    images, and the manifests get a ``boxes`` column (:data:`DETECTION_COLUMNS`), a JSON list
    ``[{"box": [x1, y1, x2, y2], "label": name}]`` (see :func:`render`), ``[]`` for ``empty``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    size = (int(size[0]), int(size[1]))
    mask = Image.fromarray(invalid_mask(size))
    mask.save(out / "static_mask.png")
    for split_id, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        labels = _labels(n, np.random.default_rng([seed, split_id]))
        rows = []
        for i, label in enumerate(labels):
            # One stream per image, independent of variant: clean and shortcut share every scene.
            rng = np.random.default_rng([seed, split_id, i])
            stem = f"{split}_{i:05d}"
            img, box = render(int(label), variant, rng, size, return_box=True) if boxes else \
                (render(int(label), variant, rng, size), None)
            Image.fromarray(img).save(out / "images" / f"{stem}.png")
            mask.save(out / "masks" / f"{stem}.png")
            row = {"image": f"images/{stem}.png", "mask": f"masks/{stem}.png",
                   "label": CLASSES[label], "split": split, "variant": variant}
            if boxes:
                row["boxes"] = json.dumps([] if box is None else [{"box": list(box), "label": CLASSES[label]}])
            rows.append(row)
        with open(out / f"{split}.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=DETECTION_COLUMNS if boxes else MANIFEST_COLUMNS, lineterminator="\n")
            wr.writeheader()
            wr.writerows(rows)
    params = {"variant": variant, "n_train": n_train, "n_test": n_test, "seed": seed,
              "size": list(size), "synth_version": SYNTH_VERSION, "classes": list(CLASSES)}
    if boxes:
        params["boxes"] = True
    (out / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return out / "test.csv"
