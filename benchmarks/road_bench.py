"""ROAD throughput: camgate's batched ``road`` vs pytorch-grad-cam's ``ROADCombined``, side by side.

Same images, maps, targets and model (resnet18, random seeded weights, 5 classes), percentiles
10..90, MoRF and LeRF, noise 0.01 both (camgate in pixel units, pytorch-grad-cam in normalised
units). camgate runs without its random-map baseline, which pytorch-grad-cam does not compute. The
order of the two alternates between rounds; min / median / max wall time are shown, and the
throughput ratio is taken on the medians. Then the curves are compared with the noise off (its
building blocks with ``NoisyLinearImputer(noise=0)``; its percentile p keeps p %, so its curve at p
is ours at 100 - p). The last line is one JSON object with every figure.

    python benchmarks/road_bench.py [--images 16] [--size 64] [--rounds 3] [--threads 1] [--large] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric, RemoveLeastRelevantFirst,
                                                              RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from camgate.metrics.road import PERCENTILES, road

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def inputs(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # smooth images (low-resolution noise upsampled) plus a little pixel noise, in [0, 1]
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    raw = torch.rand(n, 7, 7, generator=g)
    cams = F.interpolate(raw[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return x, raw, cams, torch.arange(n) % 5


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def bench(n: int, size: int, rounds: int, model, device: str = "cpu") -> dict:
    x01, raw, cams, targets = inputs(n, size)
    x01, raw, targets = x01.to(device), raw.to(device), targets.to(device)
    mean, std = MEAN.to(device), STD.to(device)
    xn = (x01 - mean) / std
    tgt = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    cams_np = cams.numpy()

    def predict(x):
        return torch.softmax(model((x - mean) / std), 1)

    out = {}
    variants = {
        "camgate": lambda: road(predict, x01, raw, targets, random_baseline=False).road.cpu().numpy(),
        "pytorch-grad-cam": lambda: ROADCombined(percentiles=list(PERCENTILES))(xn, cams_np, tgt, model),
    }
    times = {k: [] for k in variants}
    for r in range(rounds):
        names = list(variants)[r % 2:] + list(variants)[:r % 2]
        for name in names:
            t0 = time.perf_counter()
            out[name] = variants[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"  {size}x{size} round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)

    # curves with the noise off, same pixels removed up to ties / one-pixel count differences
    ours = road(predict, x01, raw, targets, noise=0.0, random_baseline=False)
    dcurve = 0.0
    for cls, curve in ((RemoveMostRelevantFirst, ours.morf), (RemoveLeastRelevantFirst, ours.lerf)):
        theirs = np.stack([PerturbationConfidenceMetric(cls(100 - p, NoisyLinearImputer(noise=0.0)))(
            xn, cams_np, tgt, model, return_diff=False) for p in PERCENTILES], 1)
        dcurve = max(dcurve, float(np.abs(curve.cpu().numpy() - theirs).max()))
    # the model's share: the forwards each variant makes, alone (camgate: one clean pass + 2·P imputed
    # images per image in chunks of 64; pytorch-grad-cam: a clean and an imputed batch per percentile
    # and direction). Their ratio bounds the speedup whatever the imputation costs.
    n_p = len(PERCENTILES)
    with torch.no_grad():
        t0 = time.perf_counter()
        predict(x01)
        for j in range(0, 2 * n_p * n, 64):
            predict(x01[torch.arange(j, min(j + 64, 2 * n_p * n)) % n])
        sync(x01)
        fwd_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(2 * n_p * 2):
            model(xn)
        sync(xn)
        fwd_theirs = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"images": n, "size": size, "rounds": rounds,
           "seconds": {k: {"min": min(v), "median": med[k], "max": max(v)} for k, v in times.items()},
           "images_per_s": {k: n / med[k] for k in med},
           "speedup": med["pytorch-grad-cam"] / med["camgate"],
           "max_abs_delta_road_noise_on": float(np.abs(out["camgate"] - out["pytorch-grad-cam"]).max()),
           "max_abs_delta_curves_noise_off": dcurve,
           "forwards_only_seconds": {"camgate": fwd_ours, "pytorch-grad-cam": fwd_theirs}}
    print(f"{size}x{size}, {n} images, {rounds} rounds (seconds min / median / max):")
    for k, v in res["seconds"].items():
        print(f"  {k:17s} {v['min']:7.2f} {v['median']:7.2f} {v['max']:7.2f}   {res['images_per_s'][k]:7.2f} images/s")
    print(f"  throughput ratio camgate / pytorch-grad-cam: {res['speedup']:.1f}x")
    print(f"  model forwards alone: camgate {fwd_ours:.2f} s, pytorch-grad-cam {fwd_theirs:.2f} s "
          f"(ceiling on the ratio if imputation were free: {(med['pytorch-grad-cam']) / fwd_ours:.1f}x)")
    print(f"  max |Δ| ROAD (noise on, different draws/units): {res['max_abs_delta_road_noise_on']:.2e}; "
          f"max |Δ| curves (noise off): {dcurve:.2e}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fair to scipy's one-thread solve)")
    ap.add_argument("--large", action="store_true", help="also 2 images at 224x224, 1 round")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (pytorch-grad-cam's spsolve stays on the CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval().to(args.device)
    results = [bench(args.images, args.size, args.rounds, model, args.device)]
    if args.large:
        results.append(bench(2, 224, 1, model, args.device))
    print(json.dumps({"device": args.device, "threads": args.threads, "torch": torch.__version__, "runs": results}))


if __name__ == "__main__":
    main()
