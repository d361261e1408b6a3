"""All-layer CAMs in one pass vs one Grad-CAM vs one pass per layer (the CAManim reference's way).

One process, same batch, variants interleaved with the order rotated every round; min / median / max
per variant. The per-layer variants run a handful of layers spread over the network and are
extrapolated to all layers (their cost per layer x the number of frames). Peak memory of each
variant is measured in a fresh subprocess (rise of peak RSS over the resident baseline, CPU; or
``torch.cuda.max_memory_allocated`` over the allocated baseline, GPU). The last line of the output is
one JSON object with every figure.

    python benchmarks/layers_bench.py [--arch resnet50] [--batch 4] [--size 224] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from camgate.cam import CamEngine
from camgate.cam.layers import layer_maps, plan_layers
from camgate.model.layers import default_target_layers, resolve_layers


def setup(args):
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=1000).eval().to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(args.device)
    model.requires_grad_(False)
    plan = plan_layers(model, x[:1])
    return model, x, plan


def target_layers(model):
    """camgate's default Grad-CAM layer for the architecture (resnet50: layer4.2)."""
    return resolve_layers(model, default_target_layers(model, f"torchvision/{type(model).__name__.lower()}"))


def sample(plan, k):
    """k layers called once per forward, spread evenly from the first to the last frame."""
    twice = {r.name for r in plan.layers if r.call > 0}
    once = [r.name for r in plan.layers if r.name not in twice]
    return [once[round(i * (len(once) - 1) / (k - 1))] for i in range(k)]


def variants(model, x, plan, names):
    mods = dict(model.named_modules())
    engine = CamEngine(model, target_layers(model))

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize()

    def inference():
        with torch.no_grad():
            model(x)
        sync()

    def all_layers():
        layer_maps(model, x, plan)
        sync()

    def one_gradcam():
        engine(x)
        sync()

    def rerun_camgate():  # one camgate Grad-CAM pass per layer
        for n in names:
            CamEngine(model, [mods[n]])(x)
        sync()

    def rerun_pgc():  # pytorch-grad-cam per layer, trainable parameters, as the CAManim code runs it
        import pytorch_grad_cam as pgc

        model.requires_grad_(True)
        try:
            for n in names:
                with pgc.GradCAM(model=model, target_layers=[mods[n]]) as cam:
                    cam(x, targets=None)
        finally:
            model.requires_grad_(False)
        sync()

    return {"inference": inference, "all_layers_one_pass": all_layers, "one_gradcam": one_gradcam,
            "per_layer_camgate": rerun_camgate, "per_layer_pytorch_grad_cam": rerun_pgc}


def peak_memory(args, variant) -> float:
    """MB the variant adds to peak memory, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", variant, "--arch", args.arch, "--batch", str(args.batch),
           "--size", str(args.size), "--device", args.device, "--threads", str(args.threads), "--sample", "1"]
    # A fixed mmap threshold stops glibc from keeping freed large blocks on its heap (its dynamic
    # threshold rises after the first frees), so RSS follows the tensors actually alive.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.split()[-1])


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(args):
    model, x, plan = setup(args)
    fn = variants(model, x, plan, sample(plan, 2)[-1:])[args.memory_of]
    fn()  # warm-up: allocator caches, lazy init
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS: setup's peak does not count
    base = _status_mb("VmRSS")
    fn()
    print(max(0.0, _status_mb("VmHWM") - base))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample", type=int, default=4, help="layers timed for the per-layer variants")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_memory(args)

    model, x, plan = setup(args)
    names = sample(plan, args.sample)
    n = len(plan.layers)
    fns = variants(model, x, plan, names)
    for fn in fns.values():  # warm-up: allocator, lazy init
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        for k in rot:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)

    per_layer = {"per_layer_camgate", "per_layer_pytorch_grad_cam"}
    rows = {}
    for k, ts in times.items():
        scale = n / len(names) if k in per_layer else 1.0  # extrapolated to all frames
        rows[k] = {s: f(ts) * scale * 1000 for s, f in (("min", min), ("median", statistics.median), ("max", max))}
    # sanity: the one-pass map of the last frame (resnet: layer4.2.relu#2, whose output layer4.2
    # returns) is the single-layer engine's map
    last = CamEngine(model, target_layers(model))(x).cams
    delta = float((layer_maps(model, x, plan).maps[-1] - last).abs().max())

    mem = {} if args.no_memory else {k: peak_memory(args, k) for k in ("inference", "one_gradcam",
                                                                      "all_layers_one_pass")}
    med = {k: v["median"] for k, v in rows.items()}
    result = {
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}, "
                   f"{args.device}, torch {torch.__version__}, {args.threads} threads",
        "arch": args.arch, "batch": args.batch, "size": args.size, "rounds": args.rounds,
        "frames": n, "sampled_layers": names, "ms": rows, "peak_mb": mem,
        "all_layers_over_one_gradcam": med["all_layers_one_pass"] / med["one_gradcam"],
        "one_gradcam_over_inference": med["one_gradcam"] / med["inference"],
        "per_layer_camgate_over_all_layers": med["per_layer_camgate"] / med["all_layers_one_pass"],
        "per_layer_pgc_over_all_layers": med["per_layer_pytorch_grad_cam"] / med["all_layers_one_pass"],
        "max_abs_delta_last_layer_vs_engine": delta,
    }
    print(f"{args.arch}, batch {args.batch}, {args.size}px, {n} frames, {args.rounds} rounds ({result['machine']})")
    print(f"{'variant':32} {'min ms':>10} {'median ms':>10} {'max ms':>10} {'peak MB':>9}")
    for k, v in rows.items():
        note = " (extrapolated)" if k in per_layer else ""
        m = f"{mem[k]:9.0f}" if k in mem else " " * 9
        print(f"{k + note:32} {v['min']:10.0f} {v['median']:10.0f} {v['max']:10.0f} {m}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
