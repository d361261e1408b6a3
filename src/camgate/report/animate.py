"""Per-layer CAM animations (CAManim): frames rendered with numpy, H.264 MP4, GIF and a contact sheet.

Design decisions:

* Frames are numpy uint8 (H, W, 3): the colour map is a 256-entry table sampled once from
  matplotlib, the heatmap is upsampled bilinearly (half-pixel centres, like the rest of camgate) and
  alpha-blended over the model's view of the image; Pillow only draws the text banner (frame
  number, layer, map size, normalisation).
* ``norm="both"`` puts the two views side by side: *global* (one range over all layers' raw maps, a
  weak layer stays dark) | *layer* (each map on its own full range).
* The MP4 is streamed to imageio-ffmpeg's ffmpeg binary through a pipe as raw RGB: no temporary
  images. yuv420p needs even sizes, so frames are padded (black, right/bottom). A failing encoder
  raises :class:`EncodeError` with ffmpeg's last words, and the partial file is removed.
* :func:`animate` keeps the rendered frames in memory for the GIF and the contact sheet
  (frames x width x height x 3 bytes: ~150 MB for DenseNet-121's 369 layers, both panels at 256 px).
"""
from __future__ import annotations

import io
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import CamgateError, ConfigError
from ..settings import default
from .overlays import boundary, colormap, font, resized_mask

BANNER = 18  # px of text strip above each panel


class EncodeError(CamgateError, RuntimeError):
    """The video encoder failed (bad codec, unwritable path, ffmpeg crash)."""


def _resize_map(heat, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32, bilinear with half-pixel centres."""
    t = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t[0, 0].cpu().numpy()


def render_panel(base: np.ndarray, heat, title: str, note: str = "", edge: np.ndarray | None = None,
                 alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """One panel: ``heat`` ((h, w) in [0, 1]) coloured and blended over ``base`` (H, W, 3 uint8),
    invalid-region outline ``edge`` (bool (H, W)) in white, a text banner on top."""
    h, w = base.shape[:2]
    idx = np.clip(np.rint(_resize_map(heat, (h, w)) * 255), 0, 255).astype(np.uint8)
    out = ((1 - alpha) * base + alpha * colormap(cmap)[idx]).round().astype(np.uint8)
    if edge is not None:
        out[edge] = 255
    panel = Image.new("RGB", (w, h + BANNER))
    panel.paste(Image.fromarray(out), (0, BANNER))
    draw = ImageDraw.Draw(panel)
    draw.text((3, 3), title, fill=(255, 255, 255), font=font(12))
    if note:
        right = draw.textlength(note, font=font(12))
        draw.text((w - 3 - right, 3), note, fill=(255, 200, 80), font=font(12))
    return np.asarray(panel)


def render_frames(view: np.ndarray, normed: dict[str, list], labels: Sequence[str], mask=None,
                  width: int = 256, alpha: float = 0.5, cmap: str = "jet") -> Iterable[np.ndarray]:
    """Frames for one image: ``view`` (H, W, 3) uint8, ``normed`` {"global"|"layer": [(h, w) maps]},
    panels side by side in the dict's order; ``mask`` bool (H, W) invalid pixels of the view."""
    size = (max(1, round(view.shape[0] * width / view.shape[1])), width)
    base = np.asarray(Image.fromarray(view).resize(size[::-1], Image.BILINEAR), dtype=np.float32)
    edge = boundary(resized_mask(mask, size)) if mask is not None else None
    n = len(labels)
    for i, label in enumerate(labels):
        panels = []
        for mode, maps in normed.items():
            hw = "x".join(str(s) for s in maps[i].shape[-2:])
            panels.append(render_panel(base, maps[i], f"{i + 1}/{n} {label} {hw}", mode, edge, alpha, cmap))
        gap = np.zeros((panels[0].shape[0], 2, 3), np.uint8)
        yield np.concatenate([p for pair in zip(panels, [gap] * len(panels)) for p in pair][:-1], 1)


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_mp4(frames: Iterable[np.ndarray], path, fps: float = 8, codec: str = "libx264") -> int:
    """Stream uint8 (H, W, 3) frames to an H.264/yuv420p MP4 at ``path``; returns the frame count.

    All frames must have the first frame's size; odd sizes are padded to even with black."""
    path = Path(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ConfigError("no frames to encode")
    h, w = first.shape[:2]
    ph, pw = h % 2, w % 2
    cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w + pw}x{h + ph}", "-r", str(fps), "-i", "-", "-an", "-c:v", codec,
           "-pix_fmt", "yuv420p", *(["-crf", "18"] if codec == "libx264" else []),
           "-movflags", "+faststart", str(path)]
    existed = path.exists()
    count, broken = 0, None
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: ffmpeg can never block on stderr
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=err)
        try:
            for frame in _chain(first, it):
                if frame.shape != first.shape:
                    raise ConfigError(f"frame {count} is {frame.shape}, the first was {first.shape}")
                if ph or pw:
                    frame = np.pad(frame, ((0, ph), (0, pw), (0, 0)))
                try:
                    proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                except OSError as e:  # BrokenPipeError: ffmpeg exited early; its stderr says why
                    broken = e
                    break
                count += 1
        except BaseException:
            proc.kill()
            proc.wait()
            if not existed:
                path.unlink(missing_ok=True)
            raise
        try:
            proc.stdin.close()
        except OSError:
            pass
        rc = proc.wait()
        if rc != 0 or broken is not None:
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace").strip()
            if not existed:
                path.unlink(missing_ok=True)
            raise EncodeError(f"ffmpeg failed writing {path} (exit code {rc}"
                              f"{', broken pipe' if broken else ''}): {tail or 'no message'}")
    return count


def _chain(first, rest):
    yield first
    yield from rest


def write_gif(frames: Sequence[np.ndarray], path, fps: float = 8) -> None:
    """Looping GIF with one adaptive palette for all frames (median cut over pixels of up to 16 of them, so
    colours do not flicker between frames), no dithering. Pixels map to the palette through a
    32x32x32 lookup cube: a table lookup per frame instead of Pillow's per-pixel nearest search."""
    if not frames:
        raise ConfigError("no frames to write")
    pick = np.linspace(0, len(frames) - 1, min(16, len(frames))).round().astype(int)
    sample = Image.fromarray(np.ascontiguousarray(np.concatenate([frames[i][::3, ::3] for i in pick], 0)))
    pal = np.asarray(sample.quantize(256, method=Image.Quantize.MEDIANCUT).getpalette()[:768],
                     np.int32).reshape(-1, 3)
    levels = np.arange(32) * 8 + 4  # centre of each 5-bit bin
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    pal_f = pal.astype(np.float32)
    dist = (pal_f ** 2).sum(1)[None] - 2 * cube @ pal_f.T  # |c - p|^2 less |c|^2, the same for all p
    lut = dist.argmin(1).astype(np.uint8).reshape(32, 32, 32)
    flat_pal = pal.astype(np.uint8).ravel().tolist()
    imgs = []
    for f in frames:
        q = f >> 3
        im = Image.fromarray(lut[q[..., 0], q[..., 1], q[..., 2]], mode="P")
        im.putpalette(flat_pal)
        imgs.append(im)
    imgs[0].save(path, format="GIF", save_all=True, append_images=imgs[1:], loop=0,
                 duration=max(20, round(1000 / fps)))


def contact_sheet(frames: Sequence[np.ndarray], cols: int = 8, labels: Sequence[str] | None = None,
                  pad: int = 4, tile_width: int | None = None) -> bytes:
    """All frames in a grid (row-major), optional label under each, as PNG bytes; ``tile_width``
    scales the frames down (bilinear) for sheets of many layers."""
    if not frames:
        raise ConfigError("no frames for a contact sheet")
    h, w = frames[0].shape[:2]
    if tile_width and tile_width < w:
        size = (tile_width, max(1, round(h * tile_width / w)))
        frames = [np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames]
        h, w = size[1], size[0]
    cols = max(1, min(cols, len(frames)))
    rows = -(-len(frames) // cols)
    lh = 16 if labels else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + lh + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, f in enumerate(frames):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + lh + pad)
        sheet.paste(Image.fromarray(f), (x, y))
        if labels:
            draw.text((x + 2, y + h + 2), labels[i], fill=(230, 230, 230), font=font(12))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def model_view_of(image, spec, mask):
    """-> (x (1, 3, H, W), view uint8 (H, W, 3), mask of the view or None)."""
    if torch.is_tensor(image):  # an already normalised (3, H, W) / (1, 3, H, W) model input
        x = image.detach().float().reshape(1, *image.shape[-3:])
        v = x[0].cpu() * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)
        view = (v.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return x, view, None if mask is None else np.asarray(mask, bool)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    h, w = spec.size
    box = spec.box(*img.size)
    view = np.asarray(img.crop(box).resize((w, h), Image.BILINEAR))
    if mask is not None:
        left, top, right, bottom = box
        mask = np.asarray(mask, bool)[top:bottom, left:right]
    return spec.image_tensor(img)[None], view, mask


def animate(model, image, out_dir, *, mask=None, layers: str | list[str] = "all", method: str = default("method"),
            norm: str = "both", fps: float = 8, target: int = -1, width: int = 256, cmap: str = "jet") -> dict:
    """Plan, compute and write ``layers.mp4``, ``layers.gif``, ``contact_sheet.png`` and ``layers.json``
    (frame list, skipped modules with reasons, unreached layers) under ``out_dir``; returns their paths.

    ``model``: a ``camgate.model.LoadedModel`` (its input spec prepares the image and cuts the
    mask to the model's view) or a plain ``nn.Module`` (ImageNet normalisation, image size as is).
    ``image``: PIL image / uint8 (H, W, 3) array, or a normalised (3, H, W) input tensor.
    ``mask``: bool (H, W) invalid pixels of ``image``, outlined on every frame.
    """
    from ..cam.layers import layer_maps, plan_layers
    from ..data.geometry import InputSpec

    norm_modes(norm)  # a bad option fails before any compute
    net = getattr(model, "model", model)
    if hasattr(model, "card"):
        spec, device = model.card.input, torch.device(model.device)
    else:
        size = tuple(image.shape[-2:]) if torch.is_tensor(image) else (
            (image.height, image.width) if isinstance(image, Image.Image) else np.asarray(image).shape[:2])
        spec = InputSpec(size=size)
        device = next(net.parameters(), torch.empty(0)).device
    x, view, vmask = model_view_of(image, spec, mask)
    x = x.to(device)
    plan = plan_layers(net, x, layers)
    if not plan.layers:
        raise ConfigError("the model has no layer with a spatial map to animate")
    res = layer_maps(net, x, plan, method, targets=torch.tensor([target]))
    info = {"method": method, "target": int(res.targets[0]), "predicted": int(res.logits[0].argmax()),
            "layers": [{"index": r.index, "name": r.name, "call": r.call, "label": r.label,
                        "size": list(m.shape[-2:])} for r, m in zip(plan.layers, res.maps)],
            "unreached": [r.label for r in res.unreached],
            "skipped": [{"name": n, "reason": why} for n, why in plan.skipped]}
    return write_animation(view, [m[0] for m in res.maps], plan.names(), out_dir, mask=vmask, norm=norm,
                           fps=fps, width=width, cmap=cmap, info=info)


def norm_modes(norm: str) -> list[str]:
    """``--norm`` -> the panels of a frame (``both``: global | layer side by side)."""
    modes = {"both": ["global", "layer"], "global": ["global"], "layer": ["layer"]}.get(norm)
    if modes is None:
        raise ConfigError(f"norm must be global, layer or both, got {norm!r}")
    return modes


def write_animation(view: np.ndarray, maps: Sequence, labels: Sequence[str], out_dir, *, mask=None,
                    norm: str = "both", fps: float = 8, width: int = 256, cmap: str = "jet",
                    info: dict | None = None) -> dict:
    """One image's raw per-layer maps ((h_l, w_l) each) -> ``layers.mp4``, ``layers.gif``,
    ``contact_sheet.png`` and ``layers.json`` under ``out_dir``; returns their paths.

    ``view``: the model's view of the image, uint8 (H, W, 3); ``mask``: bool (H, W) invalid pixels of it."""
    from ..cam.layers import normalise

    modes = norm_modes(norm)
    raw = [torch.as_tensor(np.asarray(m, np.float32))[None] for m in maps]
    normed = {m: [t[0] for t in normalise(raw, m)] for m in modes}
    frames = list(render_frames(view, normed, labels, mask, width, cmap=cmap))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"mp4": out / "layers.mp4", "gif": out / "layers.gif", "contact_sheet": out / "contact_sheet.png",
             "json": out / "layers.json"}
    write_mp4(frames, paths["mp4"], fps)
    write_gif(frames, paths["gif"], fps)
    # many layers: half-size tiles (the banner text then too small: labels under the tiles)
    small = len(frames) > 32
    paths["contact_sheet"].write_bytes(contact_sheet(
        frames, cols=(16 if small else 8) // len(modes), labels=labels if small else None,
        tile_width=frames[0].shape[1] // 2 if small else None))
    paths["json"].write_text(json.dumps({"norm": norm, **(info or {})}, indent=1))
    return paths


def animation_html(out_dir, title: str) -> str:
    """A self-contained page for KFP's HTML viewer: the GIF (the contact sheet when the GIF would
    make the page too large: the viewer fetches it whole, 10 MB at most) and the per-layer invalid
    activation ratio from ``layers.parquet``."""
    import base64
    import html

    import pyarrow.parquet as pq

    out = Path(out_dir)
    gif = out / "layers.gif"
    pic, kind = (gif, "gif") if gif.stat().st_size < 6_000_000 else (out / "contact_sheet.png", "png")
    img = base64.b64encode(pic.read_bytes()).decode("ascii")
    t = pq.read_table(out / "layers.parquet", columns=["layer", "invalid_activation_ratio"]).to_pydict()
    cells = "".join(f"<tr><td>{i}</td><td>{html.escape(str(n))}</td><td>"
                    f"{'n/a' if v is None else f'{v:.3f}'}</td></tr>"
                    for i, (n, v) in enumerate(zip(t["layer"], t["invalid_activation_ratio"])))
    name = html.escape(str(title))
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>camgate layers: {name}</title>"
            f"</head><body><h1>Maps through the layers</h1><p>{name}</p>"
            f"<img alt='maps of every layer' src='data:image/{kind};base64,{img}'>"
            f"<h2>Invalid activation per layer</h2><table><tr><th>#</th><th>layer</th>"
            f"<th>invalid activation ratio</th></tr>{cells}</table></body></html>\n")


def animate_image(model, image: str, out_dir, *, mask: str | None = None, layers: str = default("layers"),
                  method: str = default("method"), target=default("target"), norm: str = default("norm"),
                  fps: float = default("fps"), mask_spec=None, device: str = default("device")) -> dict:
    """``camgate animate``: one image (URI) through every layer. The maps are computed once into
    ``out_dir/layers.parquet`` (as ``camgate layers`` would) and the frames are rendered from those
    stored maps; returns the paths of the Parquet, the MP4, the GIF, the contact sheet and the JSON."""
    import posixpath

    from .. import runner
    from ..data.decode import MaskSpec, decode_image, decode_mask
    from ..data.manifest import DataError, Item
    from ..io import results, storage
    from ..model.load import load_model

    norm_modes(norm)
    mask_spec = mask_spec or MaskSpec()
    lm = model if hasattr(model, "card") else load_model(model, device=device)
    stem = posixpath.splitext(posixpath.basename(image))[0]
    table = storage.join(str(out_dir), "layers.parquet")
    runner.run_layers(lm, image, table, items=[Item(0, stem, image, mask, None, {})], layers=layers,
                      method=method, target=target, mask_spec=mask_spec, progress=False)
    rows = results.read_table(table).to_pylist()
    if rows[0]["status"] == "error":
        raise DataError(rows[0]["error"])
    img = decode_image(storage.read_bytes(image), image)
    full = decode_mask(storage.read_bytes(mask), mask, mask_spec, img.size) if mask else None
    _, view, vmask = model_view_of(img, lm.input, full)
    md = results.run_metadata(table)
    info = {"method": md["method"], "target": rows[0]["target_class"], "predicted": rows[0]["predicted_class"],
            "layers": [r["layer"] for r in rows], "skipped": md["skipped_layers"],
            "invalid_activation_ratio": [r["invalid_activation_ratio"] for r in rows]}
    paths = write_animation(view, [results.cam_array(r) for r in rows], [r["layer"] for r in rows], out_dir,
                            mask=vmask, norm=norm, fps=fps, info=info)
    return {"parquet": table, **paths}
