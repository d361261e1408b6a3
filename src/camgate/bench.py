"""``camgate bench``: no_grad inference, camgate (on a frozen and on a trainable model), a minimal
Grad-CAM and pytorch-grad-cam, side by side.

Timing is kept fair three ways. Each variant gets its own copy of the model, so none pays for
another's hooks (pytorch-grad-cam registers its hooks at construction, and they stay). The order of
the variants rotates every round, so no variant always runs right after the same one (caches,
allocator, CPU frequency). And every round times all variants on the same batch, so machine noise
hits them alike: min/median/max per variant and, per round, the ratios between variants, whose spread
shows how much the noise moved them. The "floor" is the least a Grad-CAM can do with hooks: a forward
hook detaches the target activation into a fresh leaf that requires grad and hands it on,
``autograd.grad(score, leaf)``, weights = mean gradient, ReLU(weighted sum). It runs on a frozen
copy of the model: Grad-CAM needs no parameter gradient, and the least it can cost is with no graph
recorded before the target layer. camgate is timed twice: on a frozen copy (``camgate``) and on a
trainable one (``camgate_trainable``, the model as a user holds it, ``requires_grad`` on), where it
freezes the parameters for the call itself; both are compared with that same floor, so
``camgate_trainable/floor`` includes whatever getting there from a trainable model costs. Each target
depth is timed separately: at ``layer4`` the backward covers pooling + fc only, at ``layer3`` a whole
stage.

Memory: the full ``run`` step (files -> results Parquet) over N and 10·N images in fresh processes;
their peak RSS ratio, and the slope in MB per 1,000 images, show whether memory grows with the
number of images. The last line is one JSON object with every figure, for comparing runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
import torch

from . import settings

VARIANTS = ("inference", "camgate", "camgate_trainable", "floor", "pytorch_grad_cam")
# numerator, denominator: ratios of medians and their spread over rounds
RATIOS = (("camgate", "inference"), ("floor", "inference"), ("camgate", "floor"),
          ("camgate_trainable", "floor"), ("pytorch_grad_cam", "camgate"), ("pytorch_grad_cam", "inference"))
LABELS = {"camgate_trainable": "camgate(trainable)"}  # how the printed table names a variant


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet50", help="torchvision architecture (random weights)")
    p.add_argument("--method", default=settings.default("method"),
                   help="gradcam (with the floor), gradcam++, layercam, xgradcam or hirescam (without)")
    p.add_argument("--layers", default="layer4,layer3", help="target layers, each timed on its own")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--mem-images", default="200,2000", help="image counts for the memory check ('' = skip)")
    p.add_argument("--mem-arch", default=None, help="architecture for the memory check (default: --arch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    p.add_argument("--mem-child", nargs=3, metavar=("CARD", "MANIFEST", "OUT"), help=argparse.SUPPRESS)


def _peak_rss_reset() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def floor_gradcam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The minimal hand-written Grad-CAM (raw maps, (B, h, w)) for the predicted class.

    It does nothing about ``requires_grad``: the bench gives it a frozen model, where it records no
    graph before ``layer`` and computes no parameter gradient. On a trainable model it would record
    the graph of every layer before the target and no longer be a floor.
    """
    kept = []

    def hook(_module, _inputs, out):
        leaf = out.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf

    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(score, kept)
    finally:
        h.remove()
    with torch.no_grad():
        return (grad.mean((2, 3))[:, :, None, None] * kept[0]).sum(1).clamp(min=0)


def _spread(xs: list[float], scale: float = 1.0, nd: int = 3) -> dict:
    return {"min": round(min(xs) * scale, nd), "median": round(statistics.median(xs) * scale, nd),
            "max": round(max(xs) * scale, nd)}


def time_layer(base: torch.nn.Module, layer: str, method: str, x: torch.Tensor, rounds: int, warmup: int,
               dev: torch.device) -> dict:
    """All variants at one target layer, each on its own copy of ``base``, rotating order."""
    import pytorch_grad_cam as pgc

    from .cam import CamEngine, normalized
    from .model.layers import resolve_layers

    def copy_of(trainable: bool):
        m = copy.deepcopy(base).requires_grad_(trainable)
        return m, resolve_layers(m, [layer])

    ref_cls = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
               "xgradcam": pgc.XGradCAM, "hirescam": pgc.HiResCAM}[method]
    m_inf, _ = copy_of(False)
    m_cg, l_cg = copy_of(False)  # frozen, as the runner's model (frozen at load)
    m_tr, l_tr = copy_of(True)  # the model as a user holds it: camgate freezes it for each call
    # The floor on a frozen copy: the least a Grad-CAM costs, one that computes no parameter gradient
    # and records no graph before the target. Both camgate variants are measured against it.
    m_fl, l_fl = copy_of(False)
    m_ref, l_ref = copy_of(True)  # pytorch-grad-cam as users run it: trainable parameters, full backward
    engine, ref = CamEngine(m_cg, l_cg, method), ref_cls(model=m_ref, target_layers=l_ref)
    engine_tr = CamEngine(m_tr, l_tr, method)
    out: dict = {}

    def infer():
        with torch.no_grad():
            m_inf(x)

    def camgate():
        out["camgate"] = engine(x).cams

    def camgate_trainable():
        out["camgate_trainable"] = engine_tr(x).cams

    def floor():
        out["floor"] = floor_gradcam(m_fl, l_fl[0], x)

    def theirs():
        out["pytorch_grad_cam"] = ref(x, targets=None)

    variants = {"inference": infer, "camgate": camgate, "camgate_trainable": camgate_trainable, "floor": floor,
                "pytorch_grad_cam": theirs}
    if method != "gradcam":
        del variants["floor"]  # the floor is Grad-CAM only
    names = list(variants)
    times = {k: [] for k in names}
    peaks = {k: 0.0 for k in names}
    for r in range(warmup + rounds):
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:  # rotate: each variant leads in turn
            out.pop(k, None)  # free the previous round's maps before measuring this one
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base_mb = torch.cuda.memory_allocated(dev) / 2**20
            else:
                _peak_rss_reset()
                base_mb = _status_mb("VmRSS") or 0.0
            _sync(dev)
            t = time.perf_counter()
            variants[k]()
            _sync(dev)
            dt = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
            if r >= warmup:
                times[k].append(dt)
                peaks[k] = max(peaks[k], peak - base_mb)  # what the call needed on top of what was resident
        print(f"{layer}: round {r + 1 - warmup}/{rounds}" if r >= warmup else f"{layer}: warm-up", file=sys.stderr)
    ref.activations_and_grads.release()
    med = {k: statistics.median(v) for k, v in times.items()}
    size = tuple(x.shape[-2:])
    delta = {"camgate_vs_pytorch_grad_cam_normalised": float(np.abs(
        normalized(out["camgate"], size).cpu().numpy() - out["pytorch_grad_cam"]).max())}
    if "floor" in out:
        delta["camgate_vs_floor_raw"] = float((out["camgate"] - out["floor"]).abs().max())
        delta["camgate_trainable_vs_floor_raw"] = float((out["camgate_trainable"] - out["floor"]).abs().max())
    else:
        delta["camgate_trainable_vs_camgate_raw"] = float((out["camgate_trainable"] - out["camgate"]).abs().max())
    if any(p.requires_grad for p in m_cg.parameters()) or not all(p.requires_grad for p in m_tr.parameters()):
        raise RuntimeError("a camgate call changed its model's requires_grad flags")
    ratios = {}
    for a, b in RATIOS:
        if a in times and b in times:
            ratios[f"{a}_over_{b}"] = {"of_medians": round(med[a] / med[b], 3),
                                       "per_round": _spread([p / q for p, q in zip(times[a], times[b])])}
    return {"layer": layer, "ms_per_batch": {k: _spread(v, 1e3, 1) for k, v in times.items()},
            "images_per_s": {k: round(x.shape[0] / v, 1) for k, v in med.items()},
            "ratios": ratios, "max_abs_delta": delta,
            "peak_mem_mb": {k: round(v, 1) for k, v in peaks.items()},
            "peak_mem_kind": "cuda_max_allocated_over_baseline" if dev.type == "cuda" else "peak_rss_over_baseline"}


def time_variants(arch: str, method: str, batch: int, size: int, rounds: int, dev: torch.device,
                  layers: Sequence[str] = ("layer4", "layer3"), warmup: int = 1) -> dict:
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.get_model(arch, weights=None, num_classes=1000).eval().to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    return {"arch": arch, "method": method, "batch_size": batch, "size": size, "rounds": rounds,
            "warmup": warmup, "order": "rotating", "model": "own copy per variant",
            "layers": {name: time_layer(base, name, method, x, rounds, warmup, dev) for name in layers}}


def _write_set(folder: str, n_distinct: int, size: int) -> tuple[str, list[str]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for i in range(n_distinct):
        name = f"img/{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        names.append(name)
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 3] = 255
    Image.fromarray(mask).save(os.path.join(folder, "mask.png"))
    return os.path.join(folder, "mask.png"), names


def memory_growth(arch: str, counts: list[int], batch: int, size: int, device: str) -> dict:
    """Peak RSS of ``camgate run`` over each image count, each in a fresh process."""
    import yaml

    out = {}
    with tempfile.TemporaryDirectory(prefix="camgate-bench-") as tmp:
        _, names = _write_set(tmp, 50, size)
        card = os.path.join(tmp, "card.yaml")
        with open(card, "w") as f:
            yaml.safe_dump({"name": "bench", "arch": f"torchvision/{arch}", "num_classes": 1000,
                            "input": {"size": [size, size]}}, f)
        for n in counts:
            manifest = os.path.join(tmp, f"m{n}.csv")
            with open(manifest, "w") as f:
                f.write("image,mask,n\n")
                f.writelines(f"{names[i % len(names)]},mask.png,{i}\n" for i in range(n))
            t = time.perf_counter()
            env = dict(os.environ, CAMGATE_BENCH_BATCH=str(batch), CAMGATE_BENCH_DEVICE=device)
            proc = subprocess.run([sys.executable, "-m", "camgate.cli", "bench", "--mem-child", card, manifest,
                                   os.path.join(tmp, f"r{n}.parquet")], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child failed: {proc.stderr[-2000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            out[str(n)] = {"peak_rss_mb": child["peak_rss_mb"], "rows": child["rows"],
                           "seconds": round(time.perf_counter() - t, 1)}
    lo, hi = out[str(counts[0])]["peak_rss_mb"], out[str(counts[-1])]["peak_rss_mb"]
    return {"arch": arch, "runs": out, "peak_rss_ratio": round(hi / lo, 3),
            "mb_per_1000_images": round((hi - lo) / (counts[-1] - counts[0]) * 1000, 2)}


def _mem_child(card: str, manifest: str, out: str) -> int:
    from .runner.heatmaps import run

    s = run(card, manifest, out, batch_size=int(os.environ.get("CAMGATE_BENCH_BATCH", "16")),
            device=os.environ.get("CAMGATE_BENCH_DEVICE", "auto"), progress=False)
    print(json.dumps({"rows": s.rows, "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


def machine_info(dev: torch.device) -> dict:
    """What a benchmark figure depends on, printed beside it (and how busy the machine was)."""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def main(args: argparse.Namespace) -> int:
    if args.mem_child:
        return _mem_child(*args.mem_child)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .model.load import pick_device

    dev = pick_device(args.device)
    machine = machine_info(dev)
    print(f"machine: {json.dumps(machine)}", file=sys.stderr)
    layers = [n.strip() for n in args.layers.split(",") if n.strip()]
    t = time_variants(args.arch, args.method, args.batch_size, args.size, args.rounds, dev, layers, args.warmup)
    print(f"{args.arch} {args.method} batch {args.batch_size} @ {args.size}px, {args.rounds} rounds "
          f"(+{args.warmup} warm-up), own model copy per variant, rotating order")
    for name, r in t["layers"].items():
        print(f"target {name}:   ms/batch  min / median / max          img/s   peak")
        for k, ms in r["ms_per_batch"].items():
            print(f"  {LABELS.get(k, k):18s} {ms['min']:8.1f} {ms['median']:8.1f} {ms['max']:8.1f}  "
                  f"{r['images_per_s'][k]:12.1f}  +{r['peak_mem_mb'][k]:.0f} MB")
        for k, q in r["ratios"].items():
            pr = q["per_round"]
            a, b = k.split("_over_")
            print(f"  {LABELS.get(a, a) + ' / ' + LABELS.get(b, b):34s} {q['of_medians']:6.3f}x  "
                  f"(per round {pr['min']:.3f} .. {pr['median']:.3f} .. {pr['max']:.3f})")
        for k, d in r["max_abs_delta"].items():
            print(f"  max |delta| {k} = {d:.2e}")
    result = {"machine": machine, "timing": t}
    counts = [int(c) for c in args.mem_images.split(",") if c.strip()]
    if len(counts) >= 2:
        m = memory_growth(args.mem_arch or args.arch, counts, args.batch_size, args.size, str(dev))
        for n, r in m["runs"].items():
            print(f"  run over {n:>5s} images: peak RSS {r['peak_rss_mb']:8.1f} MB ({r['seconds']} s)")
        print(f"  peak RSS {counts[-1]} / {counts[0]} images = {m['peak_rss_ratio']:.3f}x, "
              f"{m['mb_per_1000_images']:+.2f} MB per 1,000 images")
        result["memory"] = m
    print(json.dumps(result))
    return 0
