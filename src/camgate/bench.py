"""``camgate bench``: no_grad inference, camgate and pytorch-grad-cam measured side by side.

Timing: the same batches go through the three variants in turn, round after round, and each
variant's median is reported, so machine noise hits all of them alike. Memory: the full ``run``
step (files -> results Parquet) over N and 10·N images in fresh processes; their peak RSS ratio
shows whether memory grows with the number of images. The last line is one JSON object with every
figure, for comparing runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet50", help="torchvision architecture (random weights)")
    p.add_argument("--method", default="gradcam")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--mem-images", default="200,2000", help="image counts for the memory check ('' = skip)")
    p.add_argument("--mem-arch", default=None, help="architecture for the memory check (default: --arch)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
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


def _timed(fn, dev) -> float:
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t


def time_variants(arch: str, method: str, batch: int, size: int, rounds: int, dev: torch.device) -> dict:
    import torchvision
    import pytorch_grad_cam as pgc

    from .cam import CamEngine, normalized
    from .modelspec import default_target_layers, resolve_layers

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=1000).eval().to(dev)
    layers = resolve_layers(model, default_target_layers(model, f"torchvision/{arch}"))
    x = torch.randn(batch, 3, size, size, device=dev)
    ref_cls = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
               "xgradcam": pgc.XGradCAM, "hirescam": pgc.HiResCAM}[method]
    # pytorch-grad-cam as users run it: trainable parameters, full backward
    ref = ref_cls(model=model, target_layers=layers)
    frozen = CamEngine(model, layers, method)
    out = {}

    def infer():
        with torch.no_grad():
            model(x)

    def ours():
        model.requires_grad_(False)
        out["camgate"] = frozen(x).cams
        model.requires_grad_(True)

    def theirs():
        out["pytorch_grad_cam"] = ref(x, targets=None)

    variants = {"inference": infer, "camgate": ours, "pytorch_grad_cam": theirs}
    for fn in variants.values():  # warm-up: allocator, kernels, caches
        fn()
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            out.pop(k, None)  # free the previous round's maps before measuring this one
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev) / 2**20
            else:
                _peak_rss_reset()
                base = _status_mb("VmRSS") or 0.0
            times[k].append(_timed(fn, dev))
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
            peaks[k] = max(peaks[k], peak - base)  # what the call itself needed on top of what was resident
    med = {k: statistics.median(v) for k, v in times.items()}
    delta = float(np.abs(normalized(out["camgate"], (size, size)).cpu().numpy() - out["pytorch_grad_cam"]).max())
    return {
        "arch": arch, "method": method, "batch_size": batch, "size": size, "rounds": rounds,
        "ms_per_batch": {k: round(v * 1e3, 1) for k, v in med.items()},
        "images_per_s": {k: round(batch / v, 1) for k, v in med.items()},
        "camgate_over_inference": round(med["camgate"] / med["inference"], 3),
        "pytorch_grad_cam_over_camgate": round(med["pytorch_grad_cam"] / med["camgate"], 3),
        "pytorch_grad_cam_over_inference": round(med["pytorch_grad_cam"] / med["inference"], 3),
        "max_abs_delta_vs_pytorch_grad_cam": delta,
        "peak_mem_mb": {k: round(v, 1) for k, v in peaks.items()},
        "peak_mem_kind": "cuda_max_allocated_over_baseline" if dev.type == "cuda" else "peak_rss_over_baseline",
    }


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
    lo, hi = str(counts[0]), str(counts[-1])
    return {"arch": arch, "runs": out,
            "peak_rss_ratio": round(out[hi]["peak_rss_mb"] / out[lo]["peak_rss_mb"], 3)}


def _mem_child(card: str, manifest: str, out: str) -> int:
    from .runner import run

    s = run(card, manifest, out, batch_size=int(os.environ.get("CAMGATE_BENCH_BATCH", "16")),
            device=os.environ.get("CAMGATE_BENCH_DEVICE", "auto"), progress=False)
    print(json.dumps({"rows": s.rows, "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


def main(args: argparse.Namespace) -> int:
    if args.mem_child:
        return _mem_child(*args.mem_child)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .modelspec import pick_device

    dev = pick_device(args.device)
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(dev),
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    print(f"machine: {json.dumps(machine)}", file=sys.stderr)
    t = time_variants(args.arch, args.method, args.batch_size, args.size, args.rounds, dev)
    ms = t["ms_per_batch"]
    print(f"{args.arch} {args.method} batch {args.batch_size} @ {args.size}px, median of {args.rounds} rounds")
    for k in ("inference", "camgate", "pytorch_grad_cam"):
        print(f"  {k:18s} {ms[k]:9.1f} ms/batch  {t['images_per_s'][k]:7.1f} img/s  peak +{t['peak_mem_mb'][k]:7.1f} MB")
    print(f"  camgate / inference          = {t['camgate_over_inference']:.3f}x")
    print(f"  pytorch-grad-cam / camgate   = {t['pytorch_grad_cam_over_camgate']:.3f}x")
    print(f"  pytorch-grad-cam / inference = {t['pytorch_grad_cam_over_inference']:.3f}x")
    print(f"  max |delta| vs pytorch-grad-cam (normalised maps) = {t['max_abs_delta_vs_pytorch_grad_cam']:.2e}")
    result = {"machine": machine, "timing": t}
    counts = [int(c) for c in args.mem_images.split(",") if c.strip()]
    if len(counts) >= 2:
        m = memory_growth(args.mem_arch or args.arch, counts, args.batch_size, args.size, str(dev))
        for n, r in m["runs"].items():
            print(f"  run over {n:>5s} images: peak RSS {r['peak_rss_mb']:8.1f} MB ({r['seconds']} s)")
        print(f"  peak RSS {counts[-1]} / {counts[0]} images = {m['peak_rss_ratio']:.3f}x")
        result["memory"] = m
    print(json.dumps(result))
    return 0
