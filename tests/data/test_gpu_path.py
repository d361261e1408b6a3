"""The run engine's device path (camgate.gpu), exercised on the CPU: out-of-memory halving, amp, batch
size auto, staged inputs one batch ahead, JPEG decoding outside PIL, the CPU thread budget."""
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from camgate.cam import CamEngine
from camgate.cli import main
from camgate.data import device as gpu
from camgate.data.batches import iter_batches
from camgate.data.decode import MaskSpec
from camgate.data.geometry import InputSpec
from camgate.data.manifest import load_items
from camgate.errors import ConfigError
from camgate.io import results
from camgate.model.load import load_model
from camgate.runner.heatmaps import run

INPUT = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def jpeg(a: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def small_set(root, n=10, bright=()):
    """n JPEGs (grey, colour, odd sizes) + masks + a manifest; images at ``bright`` are all white."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    lines = ["image,mask"]
    for i in range(n):
        h, w = 40 + 3 * i, 56 - i
        a = np.full((h, w, 3), 255, np.uint8) if i in bright else rng.integers(0, 200, (h, w, 3), dtype=np.uint8)
        (root / "images" / f"{i:02d}.jpg").write_bytes(jpeg(a[..., 0] if i % 4 == 3 else a))
        m = np.zeros((h, w), np.uint8)
        m[: 5 + i] = 255
        Image.fromarray(m).save(root / "masks" / f"{i:02d}.png")
        lines.append(f"images/{i:02d}.jpg,masks/{i:02d}.png")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(root / "manifest.csv")


def card(root, arch: str, name: str = "card.yaml") -> str:
    (root / name).write_text(yaml.safe_dump({"name": arch, "arch": arch, "num_classes": 3, "input": INPUT}))
    return str(root / name)


def rows(path):
    return pq.read_table(path).to_pylist()


def test_out_of_memory_halves_the_batch_and_every_row_equals_an_uninterrupted_run(tmp_path, monkeypatch, one_thread):
    manifest = small_set(tmp_path, n=11, bright=(9,))
    ref = rows(run(card(tmp_path, "zoo:tiny_cnn"), manifest, str(tmp_path / "ref.parquet"), batch_size=8,
                   device="cpu", progress=False).out)
    monkeypatch.setenv("CAMGATE_TEST_OOM_ABOVE", "2")  # 8 -> 4 -> 2, and image 9 fails even alone
    got = rows(run(card(tmp_path, "zoo:oom_net", "oom.yaml"), manifest, str(tmp_path / "oom.parquet"), batch_size=8,
                   device="cpu", progress=False).out)
    assert [r["row"] for r in got] == list(range(11))
    assert got[9]["status"] == "error" and got[9]["error_kind"] == "model"
    assert "OutOfMemoryError" in got[9]["error"] and "09.jpg" in got[9]["error"]
    for r, g in zip(ref, got):
        if r["row"] == 9:
            continue
        assert g["status"] == r["status"] != "error"
        assert g["predicted_class"] == r["predicted_class"]
        np.testing.assert_allclose(results.cam_array(g), results.cam_array(r), rtol=1e-6, atol=1e-7)
        assert g["invalid_activation_ratio"] == pytest.approx(r["invalid_activation_ratio"], abs=1e-6, nan_ok=True)


def test_splitter_keeps_the_smaller_size_and_fails_only_what_does_not_fit_alone():
    seen, failed = [], []

    def compute(idx, ts):
        if len(idx) > 3 or 5 in idx:
            raise torch.OutOfMemoryError("CUDA out of memory")
        seen.append(list(idx))

    s = gpu.OomSplitter(8)
    s.run(compute, list(range(10)), [0] * 10, lambda i, e: failed.append((i, type(e).__name__)))
    assert failed == [(5, "OutOfMemoryError")]
    assert sorted(i for chunk in seen for i in chunk) == [i for i in range(10) if i != 5]
    assert s.limit == 1 and s.halvings == 3  # 8 -> 4 -> 2 -> 1 (image 5 alone)
    with pytest.raises(ValueError):  # anything but out-of-memory goes to the caller
        gpu.OomSplitter(4).run(lambda i, t: (_ for _ in ()).throw(ValueError("x")), [0], [0], None)


def test_amp_off_is_the_engine_bit_for_bit_and_bf16_is_recorded_and_close(tmp_path, one_thread):
    manifest = small_set(tmp_path, n=6)
    c = card(tmp_path, "zoo:tiny_cnn")
    off = rows(run(c, manifest, str(tmp_path / "off.parquet"), batch_size=4, device="cpu", progress=False).out)
    # the same maps straight from the engine, on PIL-decoded inputs, without the device path
    lm = load_model(c, device="cpu")
    engine = CamEngine(lm.model, lm.layers(), "gradcam")
    for batch in iter_batches(load_items(manifest), lm.input, MaskSpec(), 4, with_masks=False):
        cams = engine(torch.stack([s.x for s in batch])).cams.float()
        for s, cam in zip(batch, cams):
            assert off[s.item.index]["cam"] == results.cam_bytes(cam)
    t = run(c, manifest, str(tmp_path / "bf16.parquet"), batch_size=4, device="cpu", amp="bf16", progress=False).out
    assert results.run_metadata(pq.read_table(t))["amp"] == "bf16"
    assert results.run_metadata(pq.read_table(tmp_path / "off.parquet"))["amp"] == "off"
    for a, b in zip(off, rows(t)):
        cam = results.cam_array(b)
        assert cam.dtype == np.float32  # stored like a full-precision map
        np.testing.assert_allclose(cam, results.cam_array(a), atol=0.05 * float(results.cam_array(a).max()) + 1e-6)
        assert b["invalid_activation_ratio"] == pytest.approx(a["invalid_activation_ratio"], abs=0.02, nan_ok=True)


def test_batch_size_auto_and_bad_options(tmp_path, capsys, one_thread):
    assert gpu.auto_batch_size(torch.device("cpu"), probe=None) == gpu.CPU_BATCH
    # GPU sizing arithmetic: 10 GiB free, 1 GiB fixed, 100 MiB per image -> 8 GiB budget -> 71 -> 64
    assert gpu.batch_for_memory(10 << 30, 1 << 30, 100 << 20) == 64
    assert gpu.batch_for_memory(1 << 20, 1 << 30, 100 << 20) == 1
    assert gpu.batch_for_memory(1 << 40, 0, 1 << 20) == gpu.MAX_AUTO_BATCH
    manifest = small_set(tmp_path, n=3)
    s = run(card(tmp_path, "zoo:tiny_cnn"), manifest, str(tmp_path / "a.parquet"), batch_size="auto",
            device="cpu", progress=False)
    assert s.rows == 3 and s.counts["error"] == 0
    for bad in (["--batch-size", "0"], ["--batch-size", "lots"], ["--amp", "fp8"], ["--decode", "gpu"]):
        assert main(["run", "--model", card(tmp_path, "zoo:tiny_cnn"), "--data", manifest, "--out",
                     str(tmp_path / "x.parquet"), "--quiet", *bad]) == 2
        assert "error:" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        gpu.parse_batch_size(-3)


def test_inputs_are_staged_one_batch_ahead():
    pulled = []

    class S:
        def __init__(self, i):
            self.x, self.mask, self.raw, self.error = torch.full((3, 2, 2), float(i)), None, None, None

    def source():
        for k in range(3):
            pulled.append(k)
            yield [S(2 * k), S(2 * k + 1)]

    out = []
    for batch in gpu.prefetch(source(), torch.device("cpu")):
        out.append(pulled[-1])  # what had been pulled when this batch was handed out
        assert [float(s.x[0, 0, 0]) for s in batch] == [2 * len(out) - 2, 2 * len(out) - 1]
    assert out == [1, 2, 2]
    # the stacked staging copy (to another device; 'meta' stands in for a GPU here)
    on = torch.empty(3, 2, 2, device="meta")  # as if decoded on the GPU already
    moved = gpu._to_device([torch.ones(3, 2, 2), on, torch.zeros(3, 2, 2)], torch.device("meta"), pin=False)
    assert [t.device.type for t in moved] == ["meta"] * 3 and moved[1] is on and moved[2].shape == (3, 2, 2)


def test_deferred_jpegs_decode_outside_pil_within_a_few_steps(tmp_path):
    manifest = small_set(tmp_path, n=8)
    (tmp_path / "images" / "cut.jpg").write_bytes((tmp_path / "images" / "00.jpg").read_bytes()[:200])
    with open(manifest, "a") as f:
        f.write("images/cut.jpg,masks/00.png\n")
    items = load_items(manifest)
    for spec in (InputSpec(size=(32, 24)), InputSpec(size=(20, 20), resize="center_crop")):
        ref = [s for b in iter_batches(items, spec, MaskSpec(), 4) for s in b]
        staged = [s for b in gpu.prefetch(iter_batches(items, spec, MaskSpec(), 4, defer_jpeg=True),
                                          torch.device("cpu"), spec) for s in b]
        for a, b in zip(ref[:-1], staged[:-1]):
            assert b.raw is None and b.size == a.size and torch.equal(a.mask, b.mask)
            # libjpeg via torchvision and torch's antialiased resize vs PIL
            steps = (a.x - b.x).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255
            assert float(steps.max()) <= 1.01  # one 8-bit step: the resize rounds a hair differently
        assert ref[-1].error and staged[-1].error and staged[-1].x is None and "cut.jpg" in staged[-1].error


def test_cpu_budget_and_channels_last(one_thread):
    assert gpu.cpu_budget(8, torch.device("cpu")) == (1, False)  # one torch thread: one loader, between batches
    assert gpu.cpu_budget(8, torch.device("cuda")) == (8, True)
    from tests.zoo import tiny_cnn

    a, b = tiny_cnn(), tiny_cnn()
    assert gpu.channels_last(b, torch.device("cpu"), force=True)
    assert not gpu.channels_last(tiny_cnn(), torch.device("cpu"))  # CPU keeps its layout
    x = torch.randn(2, 3, 32, 32)
    ca = CamEngine(a, [a.features], "gradcam")(x).cams
    cb = CamEngine(b, [b.features], "gradcam")(x.contiguous(memory_format=torch.channels_last)).cams
    torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-6)
