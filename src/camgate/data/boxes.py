"""Ground-truth boxes of detection data: a manifest's ``boxes`` cell or COCO annotations -> :class:`GtBox`,
and COCO-style greedy matching of a detector's outputs to them.

A ``boxes`` cell is JSON text (CSV) or an already parsed list (JSONL, Parquet) of
``{"box": [x1, y1, x2, y2], "label": <class name or index>}``: xyxy in pixels of the ORIGINAL image
(edges: ``[0, 0, W, H]`` is the whole image). An empty cell means no ground truth for that image
(:func:`parse_boxes` returns None), ``[]`` an image without objects. The cell stays raw on
:class:`camgate.data.manifest.Item` and is parsed per item, so a bad cell is that item's error.

Labels are indices into the model card's ``classes`` / ``num_classes`` (torchvision's detectors keep
class 0 for the background: nothing here treats it apart). :func:`match` pairs each ground-truth box
with at most one detection; :class:`camgate.data.geometry.InputSpec` maps boxes between the original
image, the model input and the region the model sees.
"""
from __future__ import annotations

import json
import math
import numbers
import posixpath
from dataclasses import dataclass

import numpy as np
import torch

from ..io import storage
from .manifest import DataError, label_index

__all__ = ["BORDER_TOLERANCE", "Coco", "CocoImage", "GtBox", "load_coco", "match", "parse_boxes"]

BORDER_TOLERANCE = 1.0  # pixels a box may reach beyond the image's border (rounding of exported annotations)
_FORMAT = '{"box": [x1, y1, x2, y2], "label": <class name or index>}'
_COORDS = ("x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class GtBox:
    """One ground-truth object: xyxy in original image pixels and its class index."""

    box: tuple[float, float, float, float]
    label: int


# --- manifest cells ------------------------------------------------------------------------------

def parse_boxes(cell, classes: list[str] | None, num_classes: int,
                size: tuple[int, int] | None = None) -> list[GtBox] | None:
    """A ``boxes`` cell -> its boxes (None: no ground truth given; ``[]``: an image without objects).

    ``size``: (width, height) of the original image; boxes may reach :data:`BORDER_TOLERANCE` pixels
    beyond it (None: not checked). A label is a class name of ``classes`` or an index below
    ``num_classes``; a dict of :meth:`Coco.cell_for` also carries its ``category_id``, taken as the index
    when the card lists no class names. Raises ValueError naming the problem (and the box's index).
    """
    if _empty(cell):
        return None
    value = cell
    if isinstance(cell, (str, bytes)):
        try:
            value = json.loads(cell)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"boxes: not valid JSON ({e}); expected a list of {_FORMAT}") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"boxes: expected a list of {_FORMAT}, got {_kind(value)}")
    return [_gt_box(i, obj, classes, num_classes, size) for i, obj in enumerate(value)]


def _empty(cell) -> bool:
    return cell is None or (isinstance(cell, float) and math.isnan(cell)) or \
        (isinstance(cell, (str, bytes)) and not cell.strip())


def _gt_box(i: int, obj, classes, num_classes: int, size) -> GtBox:
    if not isinstance(obj, dict):
        raise ValueError(f"box {i}: expected an object {_FORMAT}, got {_kind(obj)}")
    for key in ("box", "label"):
        if obj.get(key) is None:
            raise ValueError(f"box {i}: no {key!r} (expected {_FORMAT})")
    coords = obj["box"]
    if isinstance(coords, np.ndarray):
        coords = coords.tolist()
    if not isinstance(coords, (list, tuple)) or len(coords) != 4:
        raise ValueError(f"box {i}: 'box' must be [x1, y1, x2, y2], got {_short(coords)}")
    for name, v in zip(_COORDS, coords):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise ValueError(f"box {i}: {name} is not a number: {_short(v)}")
        if not math.isfinite(v):
            raise ValueError(f"box {i}: {name} is not finite: {v}")
    x1, y1, x2, y2 = (float(v) for v in coords)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {i}: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is empty: x2 must exceed x1 and y2 exceed y1 "
                         f"(boxes are [x1, y1, x2, y2], not [x, y, width, height])")
    if size is not None:
        w, h = size
        t = BORDER_TOLERANCE
        out = [f"{n} {v:g}" for n, v, lo, hi in (("x1", x1, -t, w + t), ("y1", y1, -t, h + t),
                                                  ("x2", x2, -t, w + t), ("y2", y2, -t, h + t))
               if not lo <= v <= hi]
        if out:
            raise ValueError(f"box {i}: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the {w}x{h} image "
                             f"({', '.join(out)})")
    return GtBox((x1, y1, x2, y2), _label(i, obj, classes, num_classes))


def _label(i: int, obj: dict, classes, num_classes: int) -> int:
    label = obj["label"]
    if not classes and obj.get("category_id") is not None:  # COCO: names mean nothing to a card without them
        label = obj["category_id"]
    if isinstance(label, bool) or not isinstance(label, (str, numbers.Real)):
        raise ValueError(f"box {i}: label must be a class name or index, got {_short(label)}")
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    try:
        return label_index(label, classes, num_classes)
    except ValueError as e:
        raise ValueError(f"box {i}: {e}") from None


def _kind(v) -> str:
    return f"{type(v).__name__} {_short(v)}"


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


# --- COCO annotations ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


class Coco:
    """A COCO annotation file's images, categories and (non-crowd) boxes; see :func:`load_coco`."""

    def __init__(self, uri: str, images: list[CocoImage], categories: dict[int, str],
                 boxes: dict[int, list[dict]]):
        self.uri, self.categories = uri, categories
        self.images = {im.id: im for im in images}
        self._boxes = boxes
        self._by_base: dict[str, list[CocoImage]] = {}
        for im in images:
            self._by_base.setdefault(_parts(im.file_name)[-1], []).append(im)

    def image_for(self, image_uri: str) -> CocoImage | None:
        """The COCO image of an image URI (None: not in the file): the one whose ``file_name`` is a path
        suffix of the URI (a bare name: its basename), else the only one of the URI's basename. Several
        candidates raise :class:`DataError` naming them."""
        parts = _parts(str(image_uri))
        same_base = self._by_base.get(parts[-1], [])
        found = [im for im in same_base if _suffix(_parts(im.file_name), parts)] or same_base
        if len(found) > 1:
            raise DataError(f"COCO annotations {self.uri}: image {image_uri} matches several images: "
                            + ", ".join(f"id {im.id} {im.file_name!r}" for im in found[:5])
                            + " (their file names cannot tell which is meant)")
        return found[0] if found else None

    def cell_for(self, image_uri: str) -> list[dict] | None:
        """The ground truth of an image as a ``boxes`` cell for :func:`parse_boxes`:
        ``[{"box": [x1, y1, x2, y2], "label": category name, "category_id": id}, ...]``;
        None when the image is not in the file (no ground truth given)."""
        im = self.image_for(image_uri)
        if im is None:
            return None
        return [dict(b, box=list(b["box"])) for b in self._boxes.get(im.id, [])]


def load_coco(uri: str) -> Coco:
    """A COCO JSON file (local or s3://) -> :class:`Coco`. ``bbox`` [x, y, w, h] becomes xyxy; crowd
    annotations (``iscrowd``) are left out. A file that is not COCO raises :class:`DataError`."""
    uri = str(uri)
    name = f"COCO annotations {uri}"
    try:
        raw = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise DataError(f"cannot read {name}: {e}") from e
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{name}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("categories"), list) or not isinstance(doc.get("annotations", []), list):
        raise DataError(f"{name}: expected a JSON object with lists 'images', 'annotations' and 'categories'")

    def bad(what: str, k: int, problem: str) -> DataError:
        return DataError(f"{name}: {what}[{k}]: {problem}")

    def field(what: str, k: int, obj, key: str, kind):
        if not isinstance(obj, dict):
            raise bad(what, k, f"expected an object, got {_kind(obj)}")
        v = obj.get(key)
        ok = isinstance(v, str) and bool(v.strip()) if kind is str else \
            isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if not ok:
            raise bad(what, k, f"{key!r} must be {'a file name' if kind is str else 'an integer'}, got {_short(v)}")
        return v

    categories: dict[int, str] = {}
    for k, c in enumerate(doc["categories"]):
        cid, cname = int(field("categories", k, c, "id", int)), field("categories", k, c, "name", str)
        if cid in categories:
            raise bad("categories", k, f"id {cid} appears twice ({categories[cid]!r} and {cname!r})")
        categories[cid] = cname
    images, by_name = [], {}
    for k, im in enumerate(doc["images"]):
        img = CocoImage(int(field("images", k, im, "id", int)), field("images", k, im, "file_name", str),
                        int(field("images", k, im, "width", int)), int(field("images", k, im, "height", int)))
        key = "/".join(_parts(img.file_name))
        if key in by_name:
            raise bad("images", k, f"file_name {img.file_name!r} appears twice (image ids {by_name[key].id} and "
                                   f"{img.id})")
        by_name[key] = img
        images.append(img)
    ids = {im.id for im in images}
    if len(ids) != len(images):
        dup = next(i for i in ids if sum(im.id == i for im in images) > 1)
        raise DataError(f"{name}: image id {dup} appears twice")
    boxes: dict[int, list[dict]] = {}
    for k, a in enumerate(doc.get("annotations", [])):
        image_id, cid = int(field("annotations", k, a, "image_id", int)), int(field("annotations", k, a,
                                                                                     "category_id", int))
        if image_id not in ids:
            raise bad("annotations", k, f"image_id {image_id} is not in 'images'")
        if cid not in categories:
            raise bad("annotations", k, f"category_id {cid} is not in 'categories'")
        if a.get("iscrowd"):
            continue  # a crowd region, not one object
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or \
                not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox):
            raise bad("annotations", k, f"'bbox' must be [x, y, width, height], got {_short(bbox)}")
        x, y, w, h = bbox
        # degenerate or out-of-image boxes are left to parse_boxes: that image's error, not the file's
        boxes.setdefault(image_id, []).append({"box": [x, y, x + w, y + h], "label": categories[cid],
                                               "category_id": cid})
    return Coco(uri, images, categories, boxes)


def _parts(path: str) -> list[str]:
    """A URI or file name -> its path components ('' for none); '.' and empty components dropped."""
    path = path.replace("\\", "/")
    if "://" in path:
        path = path.split("://", 1)[1]
    return [p for p in posixpath.normpath(path).split("/") if p not in ("", ".")] or [""]


def _suffix(tail: list[str], parts: list[str]) -> bool:
    return len(tail) <= len(parts) and parts[len(parts) - len(tail):] == tail


# --- matching ------------------------------------------------------------------------------------

def match(det_boxes, det_labels, det_scores, gt: list[GtBox],
          iou_threshold: float = 0.5) -> list[tuple[int, int | None, float | None]]:
    """Each ground-truth box's detection, COCO style: detections in descending score order (ties: in
    their order) each take the still unmatched box of their label with the highest IoU >= ``iou_threshold``
    (ties: the first box). Boxes in one coordinate frame (xyxy); tensors or lists.

    Returns ``(gt index, detection index or None, IoU or None)`` for every box, in ``gt``'s order.
    """
    from torchvision.ops import box_iou

    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    db = _tensor(det_boxes, torch.float64).reshape(-1, 4)
    dl = _tensor(det_labels, torch.int64).reshape(-1)
    ds = _tensor(det_scores, torch.float64).reshape(-1)
    if not len(db) == len(dl) == len(ds):
        raise ValueError(f"detections: {len(db)} boxes, {len(dl)} labels and {len(ds)} scores")
    out: list[tuple[int, int | None, float | None]] = [(g, None, None) for g in range(len(gt))]
    if not gt or not len(db):
        return out
    gb = torch.tensor([g.box for g in gt], dtype=torch.float64)
    iou = np.nan_to_num(box_iou(db, gb).numpy(), nan=0.0)
    allowed = dl.numpy()[:, None] == np.array([g.label for g in gt], dtype=np.int64)[None, :]
    free = np.ones(len(gt), dtype=bool)
    for d in np.argsort(-ds.numpy(), kind="stable"):
        cand = np.where(allowed[d] & free, iou[d], -np.inf)
        g = int(np.argmax(cand))  # first of equal IoUs
        if np.isfinite(cand[g]) and cand[g] >= iou_threshold:
            free[g] = False
            out[g] = (g, int(d), float(cand[g]))
            if not free.any():
                break
    return out


def _tensor(x, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x, dtype=np.float64 if dtype.is_floating_point else np.int64), dtype=dtype)
