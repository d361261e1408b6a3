"""Layer animations: real ffmpeg encodes, decoded again to check codec, pixel format, size and count."""
import io
import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from camgate.errors import ConfigError
from camgate.report.animate import BANNER, EncodeError, animate, contact_sheet, render_frames, write_gif, write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one torch thread


def probe(path):
    """(meta, frames) of a video, decoded by imageio-ffmpeg's ffmpeg."""
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]
    return meta, frames


def colours(n, h, w):
    rng = np.random.default_rng(0)
    return [np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)).copy() for _ in range(n)]


def test_mp4_is_h264_yuv420p_padded_to_even_size(tmp_path):
    frames = colours(7, 33, 47)
    path = tmp_path / "v.mp4"
    assert write_mp4(iter(frames), path, fps=5) == 7  # any iterable: streamed, never all in memory
    meta, decoded = probe(path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (48, 34) and meta["fps"] == 5
    assert len(decoded) == 7
    # content survives (a flat colour through yuv420p: within a few levels), padding is black
    for src, dec in zip(frames, decoded):
        assert np.abs(dec[8:25, 8:39].astype(int) - src[8:25, 8:39]).max() <= 6
    assert decoded[0][-1].mean() < 60 and decoded[0][:, -1].mean() < 60
    assert not list(tmp_path.glob("*.png"))


def test_failing_encoder_raises_and_leaves_nothing(tmp_path):
    frames = colours(3, 16, 16)
    bad = tmp_path / "bad.mp4"
    with pytest.raises(EncodeError, match=r"ffmpeg failed .*exit code [1-9].*no_such_codec"):
        write_mp4(frames, bad, codec="no_such_codec")
    assert not bad.exists()
    with pytest.raises(EncodeError, match="No such file or directory"):
        write_mp4(frames, tmp_path / "missing" / "dir" / "v.mp4")
    with pytest.raises(ConfigError, match="frame 1"):
        write_mp4([frames[0], np.zeros((8, 8, 3), np.uint8)], tmp_path / "mixed.mp4")
    assert not (tmp_path / "mixed.mp4").exists()
    with pytest.raises(ConfigError):
        write_mp4([], tmp_path / "empty.mp4")


def test_gif_and_contact_sheet(tmp_path):
    frames = colours(5, 20, 30)
    write_gif(frames, tmp_path / "a.gif", fps=4)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 5 and gif.info["loop"] == 0 and gif.info["duration"] == 250
    gif.seek(3)
    assert np.abs(np.asarray(gif.convert("RGB")).astype(int) - frames[3]).max() <= 8
    sheet = Image.open(io.BytesIO(contact_sheet(frames, cols=2, labels=list("abcde"), pad=4)))
    assert sheet.format == "PNG" and sheet.size == (2 * 34 + 4, 3 * (20 + 16 + 4) + 4)
    assert tuple(np.asarray(sheet)[4 + 40 + 10, 4 + 10]) == tuple(frames[2][10, 10])  # row 1, col 0


def test_frames_panels_and_mask_outline():
    view = np.full((40, 60, 3), 128, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:40] = True
    maps = [torch.zeros(4, 6), torch.ones(2, 3) * 0.5]
    frames = list(render_frames(view, {"global": maps, "layer": maps}, ["a", "b#1"], mask, width=120))
    assert len(frames) == 2 and frames[0].shape == (80 + BANNER, 2 * 120 + 2, 3)
    panel = frames[0][BANNER:, :120]
    assert (panel[20, 40] == 255).all() and (panel[40, 60] != 255).any()  # outline, not the interior
    single = next(render_frames(view, {"layer": maps}, ["a", "b"], None, width=120))
    assert single.shape == (80 + BANNER, 120, 3)


def test_animate_writes_all_outputs(tmp_path):
    from camgate.model.card import ModelCard
    from camgate.model.load import load_model

    card = ModelCard.from_dict({"name": "t", "arch": "torchvision/resnet18", "num_classes": 10,
                                "input": {"size": [64, 64], "resize": "center_crop"}})
    lm = load_model(card, device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (75, 91, 3), dtype=np.uint8))
    mask = np.zeros((75, 91), bool)
    mask[:, :40] = True
    paths = animate(lm, image, tmp_path / "out", mask=mask, fps=10, norm="both", width=96)
    meta, decoded = probe(paths["mp4"])
    info = json.loads(paths["json"].read_text())
    assert len(decoded) == len(info["layers"]) == 58 and meta["codec"] == "h264"
    assert meta["size"] == (2 * 96 + 2, 96 + BANNER)
    assert Image.open(paths["gif"]).n_frames == 58
    assert Image.open(paths["contact_sheet"]).format == "PNG"
    assert info["layers"][9]["label"] == "layer1.0.relu#1" and info["unreached"] == []
    assert {"name": "fc", "reason": "output shape (1, 10) is not a (B, C, h, w) map"} in info["skipped"]
    # a plain module, a normalised tensor, a layer selection, one panel
    x = lm.input.image_tensor(image)
    paths = animate(lm.model, x, tmp_path / "plain", layers="layer3.0.conv1,layer4.1.conv2", norm="global", target=2)
    info = json.loads(paths["json"].read_text())
    assert [d["label"] for d in info["layers"]][-1] == "layer4.1.conv2" and info["target"] == 2
    assert probe(paths["mp4"])[0]["size"] == (256, 256 + BANNER)
    with pytest.raises(ConfigError, match="norm"):
        animate(lm, image, tmp_path / "x", norm="sideways")


def test_contact_sheet_scales_tiles_down():
    frames = colours(3, 20, 40)
    sheet = Image.open(io.BytesIO(contact_sheet(frames, cols=3, tile_width=20, pad=2)))
    assert sheet.size == (3 * 22 + 2, 10 + 2 + 2)
