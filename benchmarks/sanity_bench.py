"""Sanity checks' cost: camgate's randomisation and random-logit similarities against Quantus's MPRT
and RandomLogit on the same model, images and maps, side by side.

Every variant explains with the same function (camgate's Grad-CAM upsampled to the input,
``camgate.metrics.sanity.cam_explainer``, plus a 1e-9 ramp: see ``shared``), so the figures compare
the checks' orchestration and similarity computations, not two CAM implementations. Variants, each
on its own deep copy of the model, the original maps computed inside each timed call, order rotating
every round, min / median / max and per-round ratios printed:

  camgate(all)   randomisation_similarity at every depth Quantus's MPRT visits (equal work)
  camgate(3)     randomisation_similarity at its default three depths (what a run would use)
  quantus MPRT   quantus.MPRT(layer_order="top_down"), Spearman
  camgate logit  random_logit_similarity (Spearman and SSIM)
  quantus logit  quantus.RandomLogit, Spearman
  camgate checks both checks as `camgate road --sanity` computes them per batch (SanityChecks: the
                 fully randomised model, a seeded other class; Spearman and SSIM), here also paying for
                 the original maps, which a run shares with ROAD; the randomised copy is built once per
                 run, outside the timed call (its one-time cost is printed apart)

The last line compares what a user runs: Quantus' MPRT and RandomLogit with their defaults (every
layer) against camgate's checks; the others show where the difference comes from (equal work).

    PYTHONPATH=src python benchmarks/sanity_bench.py --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    try:
        import quantus
    except ImportError:  # a GPU machine without it: camgate's variants alone
        quantus = None
        print("quantus is not installed: camgate's variants only")

    from camgate.cam import CamEngine
    from camgate.metrics.sanity import (SanityChecks, cam_explainer, random_logit_similarity, randomisable,
                                        randomisation_similarity)

    if args.threads > 0:  # 0: torch's default
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = torchvision.models.get_model(args.arch, weights=None, num_classes=args.classes).eval().to(dev)
    x = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        y = base(x).argmax(1)
    n_layers = len(randomisable(base, "top_down"))
    q_kw = dict(normalise=False, abs=False, disable_warnings=True, display_progressbar=False)

    ramp = torch.linspace(0, 1e-9, args.size * args.size, device=dev).view(args.size, args.size)

    def shared(model, layers):
        """Grad-CAM plus a 1e-9 ramp: a randomised network can give all-zero maps for a whole batch,
        which Quantus refuses; both sides get the same maps, so timings compare like with like."""
        ours = cam_explainer(model, layers)
        return lambda m, inputs, targets: ours(m, inputs, targets) + ramp

    def quantus_explain(model, layers):
        ours = shared(model, layers)

        def explain(model, inputs, targets, **kwargs):
            return ours(model, torch.as_tensor(inputs, device=dev), torch.as_tensor(targets, device=dev))[:, None] \
                .cpu().numpy()

        return explain

    def variant(name):
        model = copy.deepcopy(base)
        layers = [model.get_submodule(args.layer)]
        ex = shared(model, layers)
        if name == "camgate(all)":
            return lambda: randomisation_similarity(model, layers, x, y, seed=0, depths=range(1, n_layers + 1),
                                                    explain=ex)
        if name == "camgate(3)":
            return lambda: randomisation_similarity(model, layers, x, y, seed=0, explain=ex)
        if name == "camgate checks":
            engine = CamEngine(model, layers, "gradcam")
            t = time.perf_counter()
            sanity = SanityChecks(engine, args.classes, seed=0)
            built.append(time.perf_counter() - t)

            def checks():
                cb = engine(x, y)
                return sanity(x, cb.cams, cb.targets, range(len(x)))

            return checks
        if name == "camgate logit":
            return lambda: random_logit_similarity(model, layers, x, y, num_classes=args.classes, seed=0, explain=ex)
        explain = quantus_explain(model, layers)
        if name == "quantus MPRT":
            metric = quantus.MPRT(layer_order="top_down", seed=0, **q_kw)
        else:
            metric = quantus.RandomLogit(num_classes=args.classes, seed=0,
                                         similarity_func=quantus.functions.similarity_func.correlation_spearman,
                                         **q_kw)
        kw = {"batch_size": len(x)} if name == "quantus MPRT" else {}
        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        return lambda: metric(model=model, x_batch=xs, y_batch=ys, a_batch=explain(model, xs, ys), explain_func=explain,
                              device=args.device, **kw)

    def sync(f):
        return (lambda: (f(), torch.cuda.synchronize())) if dev.type == "cuda" else f

    built: list[float] = []
    names = ["camgate(all)", "camgate(3)", "quantus MPRT", "camgate logit", "quantus logit", "camgate checks"]
    if quantus is None:
        names = [n for n in names if not n.startswith("quantus")]
    runs = {n: sync(variant(n)) for n in names}
    for n in names:  # untimed warm-up
        runs[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t)
    print(f"{args.arch} on {args.device}, {args.images} images at {args.size} px, target layer {args.layer}, "
          f"{n_layers} randomisable modules, {args.rounds} rounds, {args.threads} threads; seconds per image, "
          f"median (min .. max)")
    for n in names:
        ts = [t / args.images for t in times[n]]
        print(f"  {n:14s} {statistics.median(ts):8.4f} ({min(ts):.4f} .. {max(ts):.4f})")

    def ratio(a, b):
        per = [tb / ta for ta, tb in zip(times[a], times[b])]
        return (f"{statistics.median(times[b]) / statistics.median(times[a]):.2f}x (per round "
                f"{min(per):.2f} .. {statistics.median(per):.2f} .. {max(per):.2f})")

    print(f"camgate checks, once per run: building the randomised copy {built[0]:.3f} s")
    if quantus is None:
        return
    print(f"quantus MPRT / camgate(all): {ratio('camgate(all)', 'quantus MPRT')}")
    print(f"quantus MPRT / camgate(3):   {ratio('camgate(3)', 'quantus MPRT')}")
    print(f"quantus logit / camgate logit: {ratio('camgate logit', 'quantus logit')}")
    both = [a + b for a, b in zip(times["quantus MPRT"], times["quantus logit"])]
    per = [q / c for q, c in zip(both, times["camgate checks"])]
    whole = statistics.median(both) / statistics.median(times["camgate checks"])
    print(f"quantus MPRT + RandomLogit / camgate checks: {whole:.2f}x "
          f"(per round {min(per):.2f} .. {statistics.median(per):.2f} .. {max(per):.2f})")


if __name__ == "__main__":
    main()
