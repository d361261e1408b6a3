"""DE-CAM vs RISE vs random search at equal forward-pass budgets: deletion and insertion AUC.

    PYTHONPATH=src python benchmarks/blackbox_eval.py            # 100 test images, budgets 256/1024
    PYTHONPATH=src python benchmarks/blackbox_eval.py --quick    # smoke run, 20 images, ~1.5 min

A small CNN is trained in seconds on a synthetic task whose evidence is localised: 32x32 smooth noise
with one 8x8 striped patch (class = stripe orientation) and one 8x8 random-noise distractor patch. The CNN is then a
black box (TorchBackend). Every method gets the same budget of masked forward passes per image.

Deletion / insertion (Petsiuk et al. 2018): pixels are removed (set to 0 = the mean colour) /
inserted (into a blurred copy) in order of saliency, in ``steps`` equal steps; the AUC is the mean
target probability over the curve (trapezoid rule). Lower deletion and higher insertion are better.
Paired comparison per image: Wilcoxon signed-rank test (scipy), two-sided.
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import wilcoxon
from torch import nn

from camgate.cam.blackbox import decam, fill_image, random_search, rise
from camgate.cam.maps import minmax, upsample
from camgate.model.backends import TorchBackend

SIZE, SQ, K = 32, 8, 4


def _stripes(k: int, phase: float) -> torch.Tensor:
    """SQ x SQ pattern of class k: horizontal, vertical, diagonal, anti-diagonal stripes (period 4)."""
    r, c = torch.meshgrid(torch.arange(SQ), torch.arange(SQ), indexing="ij")
    t = (r, c, r + c, r - c)[k].float()
    return torch.cos(math.pi / 2 * t + phase)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (normalised), labels, evidence masks. Smooth noise background; one 8x8 striped patch
    whose orientation is the class; one 8x8 patch of high-contrast random noise as a distractor.
    Stripes of period 4 vanish under the blur fill and the zero fill, so masking removes evidence."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    img = img * 0.6 + 0.2 + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    ev = torch.zeros(n, SIZE, SIZE)
    pos = torch.randint(0, SIZE - SQ + 1, (n, 4), generator=g)
    for i in range(n):
        r, c, r2, c2 = pos[i].tolist()
        img[i, :, r2:r2 + SQ, c2:c2 + SQ] = 0.5 + 0.35 * torch.randn(SQ, SQ, generator=g)  # distractor
        ph = float(torch.rand(1, generator=g)) * 2 * math.pi
        img[i, :, r:r + SQ, c:c + SQ] = 0.5 + 0.4 * _stripes(int(y[i]), ph)  # evidence, drawn last
        ev[i, r:r + SQ, c:c + SQ] = 1
    return (img.clamp(0, 1) - 0.5) / 0.25, y, ev


class Net(nn.Module):
    def __init__(self, k: int = K):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(16, 24, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(24, k)

    def forward(self, x):
        return self.head(self.f(x).amax((2, 3)))  # global max: the square may be anywhere


def train(n: int = 2000, epochs: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x, y, _ = make_data(n, seed=1000 + seed)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def curve_auc(backend, x: torch.Tensor, tgt: torch.Tensor, sal: torch.Tensor, mode: str,
              steps: int = 20) -> torch.Tensor:
    """Per-image deletion/insertion AUC; sal (B, H, W) at input resolution."""
    B, _, H, W = x.shape
    order = sal.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H * W).expand(B, -1))
    rank = rank.view(B, 1, H, W)
    start, end = (x, torch.zeros_like(x)) if mode == "deletion" else (fill_image(x, "blur"), x)
    probs = []
    for k in range(steps + 1):
        n = math.ceil(k * H * W / steps)
        done = (rank < n).float()  # pixels already removed / inserted
        p = backend.probs(start * (1 - done) + end * done)
        probs.append(p.gather(1, tgt[:, None])[:, 0])
    p = torch.stack(probs, 1)
    return ((p[:, 1:] + p[:, :-1]) / 2).mean(1)


def paired(a: np.ndarray, b: np.ndarray, higher_better: bool) -> dict:
    d = (a - b) if higher_better else (b - a)  # > 0: a is better
    stat = wilcoxon(a, b) if np.any(a != b) else None
    return {"a_better": int((d > 0).sum()), "b_better": int((d < 0).sum()),
            "median_gain": float(np.median(d)), "mean_gain": float(d.mean()),
            "p_value": float(stat.pvalue) if stat is not None else 1.0}


def time_resnet(images: int, budget: int, size: int = 112) -> dict:
    """Throughput and bookkeeping share with a model of realistic cost (resnet18, random weights)."""
    import torchvision

    torch.manual_seed(0)
    backend = TorchBackend(torchvision.models.resnet18(num_classes=5).eval(), "cpu")
    x = torch.randn(images, 3, size, size)
    out = {}
    for name, fn in (("decam", decam), ("rise", rise)):
        st = {}
        fn(backend, x, torch.zeros(images, dtype=torch.long), budget=budget, seeds=list(range(images)), stats=st)
        out[name] = {"images_per_min": 60 * images / st["total_s"], "bookkeeping_share": st["bookkeeping_share"]}
        print(f"resnet18 {size}x{size}, budget {budget}: {name:5s} {out[name]['images_per_min']:.2f} img/min, "
              f"bookkeeping {100 * st['bookkeeping_share']:.1f}%", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=25, help="images per black-box call")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 avoids thread contention on a shared 2-core machine)")
    ap.add_argument("--quick", action="store_true", help="20 images, budget 256")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="val: the images the defaults were tuned on; test: fresh images")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.budgets = 20, [256]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    net = train()
    train_s = time.perf_counter() - t0
    x, y, ev = make_data(args.images, seed=7 if args.split == "test" else 3)
    backend = TorchBackend(net, "cpu")
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    print(f"trained in {train_s:.1f}s; test accuracy {acc:.3f} on {args.images} images", flush=True)
    seeds = torch.arange(args.images) + 12345
    methods = {"decam": decam, "rise": rise, "random": random_search,
               "rise_blur": lambda *a, **k: rise(*a, fill="blur", **k)}
    out = {"images": args.images, "accuracy": acc, "threads": args.threads, "results": {}}
    for budget in args.budgets:
        res = {}
        for name, fn in methods.items():
            maps, st_all = [], {"total_s": 0.0, "model_s": 0.0}
            for i in range(0, args.images, args.batch):
                st = {}
                backend.calls = 0
                m = fn(backend, x[i:i + args.batch], y[i:i + args.batch], budget=budget,
                       seeds=seeds[i:i + args.batch], stats=st)
                assert backend.calls == budget * m.shape[0], (name, backend.calls)
                maps.append(upsample(m, (SIZE, SIZE)))
                st_all["total_s"] += st["total_s"]
                st_all["model_s"] += st["model_s"]
            sal = torch.cat(maps)
            dele = curve_auc(backend, x, y, sal, "deletion", args.steps).numpy()
            ins = curve_auc(backend, x, y, sal, "insertion", args.steps).numpy()
            mm = minmax(sal)  # raw maps carry offsets (RISE's is large): compare their display view
            share = float(((mm * ev).sum((1, 2)) / mm.sum((1, 2)).clamp_min(1e-12)).mean())
            res[name] = {"deletion": dele, "insertion": ins, "evidence_share": share,
                         "images_per_min": 60 * args.images / st_all["total_s"],
                         "bookkeeping_share": 1 - st_all["model_s"] / st_all["total_s"]}
            print(f"budget {budget:5d} {name:10s} deletion {dele.mean():.4f} insertion {ins.mean():.4f} "
                  f"evidence share {share:.3f}  {res[name]['images_per_min']:.0f} img/min, "
                  f"bookkeeping {100 * res[name]['bookkeeping_share']:.1f}%", flush=True)
        tests = {}
        for other in ("rise", "random", "rise_blur"):
            for metric, hb in (("deletion", False), ("insertion", True)):
                t = paired(res["decam"][metric], res[other][metric], hb)
                tests[f"decam_vs_{other}_{metric}"] = t
                print(f"  DE-CAM vs {other:9s} {metric:9s}: DE-CAM better on {t['a_better']}/{args.images}, "
                      f"median gain {t['median_gain']:+.4f}, mean gain {t['mean_gain']:+.4f}, "
                      f"Wilcoxon p = {t['p_value']:.2g}", flush=True)
        out["results"][str(budget)] = {
            "methods": {k: {"deletion": float(v["deletion"].mean()), "insertion": float(v["insertion"].mean()),
                            "evidence_share": v["evidence_share"], "images_per_min": v["images_per_min"],
                            "bookkeeping_share": v["bookkeeping_share"]} for k, v in res.items()},
            "tests": tests}
    out["resnet18"] = time_resnet(2 if args.quick else 4, 256 if args.quick else 1024)
    out["wall_s"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
