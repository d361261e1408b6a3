"""camgate.data: manifests, prefix pairing, mask semantics, decoding, corrupt inputs, prefetch."""
from __future__ import annotations

import io
import itertools
import json
import os
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from camgate import data as D
from camgate.data import batches as batches_module
from camgate.data import decode as decode_module
from camgate.data.batches import iter_batches
from camgate.data.decode import MaskSpec, decode_image, decode_mask, load_sample
from camgate.data.geometry import InputSpec
from camgate.data.manifest import DataError, Item, load_items
from camgate.io import storage

SPEC = InputSpec(size=(8, 8))
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _restore_pil_limit(monkeypatch):
    # decode_image sets PIL's global pixel limit; keep tests that shrink it from leaking into others
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def save(path, img: Image.Image | np.ndarray, fmt: str | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(path, fmt)
    return str(path)


def noise(w, h) -> Image.Image:
    # noise does not compress, so cutting the file really truncates pixel data
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


def same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# --- manifests -------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    save(tmp_path / "imgs" / "a.png", noise(6, 4))
    save(tmp_path / "imgs" / "b.png", noise(6, 4))
    save(tmp_path / "masks" / "a.png", np.zeros((4, 6), np.uint8))
    return tmp_path


def test_csv_manifest_resolves_paths_keeps_meta_and_duplicates(folder):
    (folder / "set.csv").write_text(
        "image, mask ,label,camera,speed,note\n"
        "imgs/a.png,masks/a.png,1,007,1.5,x\n"
        "imgs/b.png,,cat,012,,\n"
        "imgs/a.png,masks/a.png,1,007,1.5,x\n")
    items = load_items(str(folder / "set.csv"))
    assert [i.index for i in items] == [0, 1, 2]
    assert [i.image_id for i in items] == ["a", "b", "a"]  # duplicates keep their own item
    assert same(items[0].image, folder / "imgs" / "a.png") and same(items[0].mask, folder / "masks" / "a.png")
    assert items[1].mask is None  # empty cell
    assert [i.label for i in items] == [1, "cat", 1]
    # '007' must not become 7; a numeric column stays numeric
    assert items[0].meta == {"camera": "007", "speed": 1.5, "note": "x"}
    assert items[1].meta == {"camera": "012", "speed": None, "note": None}
    assert all(i.error is None for i in items)


def test_jsonl_and_parquet_manifests(folder):
    rows = [{"image": "imgs/a.png", "mask": "masks/a.png", "label": 2, "image_id": "first", "site": "north"},
            {"image": "imgs/b.png", "mask": float("nan"), "label": None, "site": "south", "lux": 3}]
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.table({"image": ["imgs/a.png", "imgs/b.png"], "mask": ["masks/a.png", None],
                             "label": [2.0, float("nan")], "image_id": ["first", None],
                             "site": ["north", "south"]}), folder / "set.parquet")
    for name in ("set.jsonl", "set.parquet"):
        a, b = load_items(str(folder / name))
        assert (a.image_id, b.image_id) == ("first", "b"), name
        assert (a.label, b.label) == (2, None), name
        assert same(a.mask, folder / "masks" / "a.png") and b.mask is None, name
        assert a.meta["site"] == "north" and b.meta["site"] == "south", name
    assert load_items(str(folder / "set.jsonl"))[1].meta == {"site": "south", "lux": 3}


def test_path_escape_and_scheme_are_item_errors(folder):
    sub = folder / "sub"
    sub.mkdir()
    (sub / "set.csv").write_text(
        f"image,site\n../imgs/a.png,1\nhttp://example.com/x.png,2\n{folder / 'imgs' / 'b.png'},3\n,4\n")
    esc, http, absolute, empty = load_items(str(sub / "set.csv"))
    assert "escapes" in esc.error and "../imgs/a.png" in esc.error
    assert "unsupported URI scheme 'http'" in http.error
    assert absolute.error is None  # absolute paths are fine
    assert "empty 'image'" in empty.error
    s = load_sample(esc, SPEC, MaskSpec())
    assert s.x is None and s.error == esc.error


def test_run_level_errors(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(DataError, match=r"no column 'image'.*m\.csv|m\.csv.*no column 'image'"):
        load_items(str(tmp_path / "m.csv"))
    (tmp_path / "empty.csv").write_text("image,label\n")
    with pytest.raises(DataError, match="no items"):
        load_items(str(tmp_path / "empty.csv"))
    with pytest.raises(DataError, match="cannot read manifest"):
        load_items(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2"):
        load_items(str(tmp_path / "bad.jsonl"))
    (tmp_path / "m.txt").write_text("image\n")
    with pytest.raises(DataError, match="expected a manifest"):
        load_items(str(tmp_path / "m.txt"))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_items(str(tmp_path / "none"))


# --- prefix data sets ------------------------------------------------------------------------

def test_prefix_pairs_by_stem(tmp_path):
    save(tmp_path / "images" / "a.png", noise(5, 5))
    save(tmp_path / "images" / "b.jpg", noise(5, 5))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    save(tmp_path / "masks" / "a.png", np.zeros((5, 5), np.uint8))
    a, b = load_items(str(tmp_path) + "/")
    assert (a.image_id, b.image_id) == ("a", "b")
    assert same(a.mask, tmp_path / "masks" / "a.png") and a.error is None
    assert b.mask is None and "no mask with stem 'b' under" in b.error
    static = save(tmp_path / "static.png", np.zeros((5, 5), np.uint8))
    items = load_items(str(tmp_path), static_mask=static)
    assert [i.mask for i in items] == [static, static] and all(i.error is None for i in items)


def test_prefix_on_s3(request, tmp_path):
    try:
        bucket = request.getfixturevalue("s3_bucket")
    except pytest.FixtureLookupError:
        pytest.skip("no S3 fixtures in this checkout")
    put = getattr(storage, "write_bytes", None) or pytest.skip("storage has no write_bytes")
    img, mask = encode(noise(6, 4)), encode(Image.fromarray(np.full((4, 6), 255, np.uint8)))
    put(f"{bucket}/set/images/cam1.png", img)
    put(f"{bucket}/set/masks/cam1.png", mask)
    put(f"{bucket}/set/images/cam2.png", img)
    put(f"{bucket}/set/m.csv", b"image,mask,site\nimages/cam1.png,masks/cam1.png,n\n")
    a, b = load_items(f"{bucket}/set/")
    assert a.image == f"{bucket}/set/images/cam1.png" and a.mask == f"{bucket}/set/masks/cam1.png"
    assert b.error and "cam2" in b.error
    s = load_sample(a, SPEC, MaskSpec())
    assert s.error is None and s.mask.shape == (4, 6) and bool(s.mask.all())
    (m,) = load_items(f"{bucket}/set/m.csv")
    assert m.image == a.image and m.mask == a.mask and m.meta == {"site": "n"}
    err = load_sample(Item(0, "gone", f"{bucket}/set/images/gone.png", None, None, {}), SPEC, MaskSpec())
    assert "gone.png" in err.error


# --- masks -----------------------------------------------------------------------------------

def test_mask_nonzero_invert_and_label_ids():
    raw = np.array([[0, 7], [1, 0]], np.uint8)
    data = encode(Image.fromarray(raw))
    np.testing.assert_array_equal(decode_mask(data, "m", MaskSpec(), (2, 2)), raw != 0)
    np.testing.assert_array_equal(decode_mask(data, "m", MaskSpec(invert=True), (2, 2)), raw == 0)
    np.testing.assert_array_equal(decode_mask(data, "m", MaskSpec(invalid_ids=(7,)), (2, 2)), raw == 7)
    np.testing.assert_array_equal(decode_mask(data, "m", MaskSpec(invalid_ids=(7,), invert=True), (2, 2)), raw != 7)
    # palette: raw index counts, not the colour it maps to
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), "L").convert("P")
    pal.putpalette([0, 0, 0, 9, 9, 9, 0, 0, 0, 50, 0, 0] + [0] * 756)
    got = decode_mask(encode(pal), "m", MaskSpec(invalid_ids=(2, 3)), (2, 2))
    np.testing.assert_array_equal(got, [[False, False], [True, True]])
    # 16-bit label map keeps values above 255
    wide = np.array([[300, 5], [300, 0]], np.uint16)
    got = decode_mask(encode(Image.fromarray(wide)), "m", MaskSpec(invalid_ids=(300,)), (2, 2))
    np.testing.assert_array_equal(got, wide == 300)


def test_rgb_and_rgba_masks():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0, 2] = 5  # any channel non-zero -> invalid
    rgb[1, 2] = 255
    np.testing.assert_array_equal(decode_mask(encode(Image.fromarray(rgb)), "m", MaskSpec(), (3, 2)),
                                  [[True, False, False], [False, False, True]])
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black background stays valid: alpha is not mask content
    rgba[0, 1, 0] = 1
    got = decode_mask(encode(Image.fromarray(rgba)), "m", MaskSpec(), (3, 2))
    np.testing.assert_array_equal(got, [[False, True, False], [False, False, False]])
    with pytest.raises(ValueError, match="one channel"):
        decode_mask(encode(Image.fromarray(rgb)), "m", MaskSpec(invalid_ids=(1,)), (3, 2))


def test_mask_size_mismatch_uses_nearest():
    raw = RNG.integers(0, 2, (5, 7), dtype=np.uint8) * 255
    w, h = 11, 8  # non-integer ratios both ways
    got = decode_mask(encode(Image.fromarray(raw)), "m", MaskSpec(), (w, h))
    assert got.shape == (h, w) and got.dtype == bool
    rows = np.floor((np.arange(h) + 0.5) * 5 / h).astype(int)
    cols = np.floor((np.arange(w) + 0.5) * 7 / w).astype(int)
    np.testing.assert_array_equal(got, raw[rows][:, cols] != 0)
    small = decode_mask(encode(Image.fromarray(raw)), "m", MaskSpec(), (3, 2))
    np.testing.assert_array_equal(small, raw[np.floor((np.arange(2) + .5) * 5 / 2).astype(int)]
                                  [:, np.floor((np.arange(3) + .5) * 7 / 3).astype(int)] != 0)


def test_mask_is_cut_to_the_model_box(tmp_path):
    w, h = 40, 20
    spec = InputSpec(size=(8, 8), resize="center_crop")
    left, top, right, bottom = spec.box(w, h)
    assert (right - left, bottom - top) != (w, h)  # the crop really cuts something
    raw = (RNG.integers(0, 2, (h, w)) * 255).astype(np.uint8)
    item = Item(0, "x", save(tmp_path / "x.png", noise(w, h)), save(tmp_path / "m.png", raw), None, {})
    s = load_sample(item, spec, MaskSpec())
    assert s.error is None and s.x.shape == (3, 8, 8) and s.x.dtype == torch.float32
    assert s.mask.dtype == torch.bool and tuple(s.mask.shape) == (bottom - top, right - left)
    np.testing.assert_array_equal(s.mask.numpy(), raw[top:bottom, left:right] != 0)
    assert load_sample(Item(1, "y", item.image, None, None, {}), spec, MaskSpec()).mask is None


# --- decoding --------------------------------------------------------------------------------

def test_decode_modes():
    g = np.array([[0, 128, 255]], np.uint8)
    for img in (Image.fromarray(g, "L"), Image.fromarray(np.stack([g, g], -1), "LA")):
        out = decode_image(encode(img), "g")
        assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 1], g)
    rgba = np.dstack([RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8), np.zeros((3, 4), np.uint8)])
    np.testing.assert_array_equal(np.asarray(decode_image(encode(Image.fromarray(rgba)), "a")), rgba[..., :3])
    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    for img, fmt in ((Image.fromarray(deep), "PNG"), (Image.fromarray(deep.astype(np.int32)), "TIFF")):
        out = np.asarray(decode_image(encode(img, fmt), "d"))
        np.testing.assert_array_equal(out[..., 0], [[0, 100, 255]])
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "L").convert("P")
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    np.testing.assert_array_equal(np.asarray(decode_image(encode(pal), "p")), [[[10, 20, 30], [200, 100, 0]]])
    pal.info["transparency"] = 0
    assert decode_image(encode(pal), "pt").mode == "RGB"
    assert decode_image(encode(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "JPEG"), "c").getpixel((0, 0))[0] > 240
    one = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3))), "1x1")
    assert one.size == (1, 1) and one.getpixel((0, 0)) == (1, 2, 3)
    assert decode_image(encode(Image.new("1", (3, 2), 1)), "b").getpixel((2, 1)) == (255, 255, 255)


def _big_png_header(w: int, h: int) -> bytes:
    """A valid PNG whose IHDR declares w x h (the pixel data stays tiny)."""
    png = encode(Image.new("L", (1, 1)))
    ihdr = b"IHDR" + struct.pack(">II", w, h) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_corrupt_inputs_become_error_samples(tmp_path, monkeypatch):
    png = encode(noise(64, 64))
    jpg = encode(noise(64, 64), "JPEG")
    cases = {
        "zero": (b"", "empty file"),
        "trunc_png": (png[: len(png) // 2], "truncated or corrupt"),
        "trunc_jpg": (jpg[: len(jpg) // 2], "truncated or corrupt"),
        "text": (b"hello, not an image", "not a recognised image"),
        "bomb": (_big_png_header(50_000, 50_000), "decompression bomb"),
    }
    items = []
    for i, (name, (blob, _)) in enumerate(cases.items()):
        (tmp_path / f"{name}.img").write_bytes(blob)
        items.append(Item(i, name, str(tmp_path / f"{name}.img"), None, None, {}))
    items.append(Item(9, "gone", str(tmp_path / "gone.png"), None, None, {}))
    for item, (_, expected) in zip(items, list(cases.values()) + [(None, "not found")]):
        s = load_sample(item, SPEC, MaskSpec())
        assert s.x is None and s.mask is None, item.image_id
        assert s.error.startswith(f"image {item.image} (id {item.image_id}): ") and expected in s.error, s.error
    ok = Item(0, "ok", save(tmp_path / "ok.png", noise(11, 10)), str(tmp_path / "text.img"), None, {})
    s = load_sample(ok, SPEC, MaskSpec())
    assert s.error.startswith(f"mask {tmp_path / 'text.img'} (id ok)") and s.x is None
    # tiny limit: 110 px is in PIL's warn-only zone (1x..2x), 900 px in its error zone; both refused
    monkeypatch.setenv("CAMGATE_MAX_PIXELS", "100")
    for (w, h), action in itertools.product([(11, 10), (30, 30)], ["error", "ignore"]):
        with warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            with pytest.raises(ValueError, match="decompression bomb"):
                decode_image(encode(noise(w, h)), "b")
    monkeypatch.delenv("CAMGATE_MAX_PIXELS")
    assert load_sample(Item(0, "ok", ok.image, None, None, {}), SPEC, MaskSpec()).error is None


# --- batching --------------------------------------------------------------------------------

def _items(tmp_path, n, size=(6, 4)) -> list[Item]:
    path = save(tmp_path / "shared.png", noise(*size))
    return [Item(i, f"i{i}", path, None, None, {}) for i in range(n)]


def test_iter_batches_order_sizes_and_errors(tmp_path):
    items = _items(tmp_path, 7)
    items[3] = Item(3, "bad", str(tmp_path / "missing.png"), None, None, {})
    batches = list(iter_batches(items, SPEC, MaskSpec(), batch_size=3, workers=2))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [s for b in batches for s in b]
    assert [s.item.index for s in flat] == list(range(7))
    assert flat[3].error and all(s.error is None for i, s in enumerate(flat) if i != 3)


def test_iter_batches_bounds_look_ahead(tmp_path, monkeypatch):
    started, pulled, running, peak = [0], [0], [0], [0]
    lock = threading.Lock()
    real = D.load_sample

    def counting(item, *a, **k):
        with lock:
            started[0] += 1
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (item.index % 3))  # uneven latency: completion order != item order
        try:
            return real(item, *a, **k)
        finally:
            with lock:
                running[0] -= 1

    def source():  # a generator: memory must not depend on how many items there are
        for it in _items(tmp_path, 40):
            pulled[0] += 1
            yield it

    monkeypatch.setattr(batches_module, "load_sample", counting)  # where iter_batches looks it up
    batch, prefetch, workers = 2, 1, 3
    limit = batch * (prefetch + 1)
    received, order = 0, []
    for b in iter_batches(source(), SPEC, MaskSpec(), batch_size=batch, workers=workers, prefetch=prefetch):
        received += len(b)
        order += [s.item.index for s in b]
        assert started[0] - received <= limit and pulled[0] - received <= limit
        time.sleep(0.003)  # slow consumer: the loader must wait, not run ahead
    assert order == list(range(40)) and peak[0] <= workers
    # consumer stops early: pending loads are cancelled, not all 40 run
    started[0] = 0
    gen = iter_batches(_items(tmp_path, 40), SPEC, MaskSpec(), batch_size=batch, workers=1, prefetch=prefetch)
    next(gen)
    gen.close()
    assert started[0] <= limit + batch


def test_static_mask_read_once_per_run_and_cached_per_size(tmp_path, monkeypatch):
    static = save(tmp_path / "static.png", np.pad(np.full((2, 2), 255, np.uint8), ((0, 2), (0, 2))))
    a = save(tmp_path / "a.png", noise(8, 8))
    b = save(tmp_path / "b.png", noise(4, 4))
    own = save(tmp_path / "own.png", np.zeros((8, 8), np.uint8))  # replaced by the static mask
    items = [Item(i, str(i), a if i % 2 else b, own, None, {}) for i in range(6)]
    reads, decodes = [], []
    real_read, real_decode = storage.read_bytes, decode_module.decode_mask
    monkeypatch.setattr(storage, "read_bytes", lambda u: reads.append(u) or real_read(u))
    monkeypatch.setattr(decode_module, "decode_mask", lambda *a, **k: decodes.append(a[3]) or real_decode(*a, **k))
    out = [s for bt in iter_batches(items, SPEC, MaskSpec(), 2, workers=2, static_mask=static) for s in bt]
    assert all(s.error is None for s in out)
    assert reads.count(static) == 1 and own not in reads
    assert sorted(decodes) == [(4, 4), (8, 8)]  # once per image size, the run-start check included
    big = out[1].mask.numpy()  # 8x8 image: the 4x4 mask doubled with nearest
    assert big.shape == (8, 8) and big[:4, :4].all() and not big[4:].any() and not big[:, 4:].any()
    with pytest.raises(DataError, match="static mask"):
        iter_batches(items, SPEC, MaskSpec(), 2, static_mask=str(tmp_path / "nope.png"))  # raises at once
