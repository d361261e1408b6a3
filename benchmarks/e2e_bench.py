"""End-to-end `camgate run` from local JPEGs against compute only, side by side in one process.

Variants, each on its own copy of the model (loaded from the same card, so the same weights):

- **engine**: ``CamEngine`` on input batches already decoded and stacked in memory (compute only);
- **process**: ``Runner.process`` on samples already decoded (engine + metrics + rows, no I/O);
- **e2e**: ``camgate.runner.run`` from the JPEG files to a results Parquet (read, decode, resize,
  masks, compute, metrics, Parquet), as ``camgate run`` does;
- **e2e_overlap** (opt-in): the same, but loading with all ``--workers`` threads beside the compute,
  as camgate did on CPU before :func:`camgate.gpu.cpu_budget` (to see what the budget buys).

Every round runs each variant over all images; the order rotates every round, after untimed
warm-up rounds. Figures: img/s min / median / max over rounds, the per-round ratios e2e / engine and
process / engine, and each variant's user and system CPU seconds (system time shows threads
fighting over cores). The images are generated into a temp dir: scikit-image's sample photos,
randomly cropped, flipped and resized to WxH, saved as JPEG quality 90, with one static mask.

    python benchmarks/e2e_bench.py --count 400 --batch-size 16 --rounds 3       # CPU, quiet machine
    python benchmarks/e2e_bench.py --count 2000 --batch-size 64 --device cuda --rounds 5 --amp bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import yaml
from PIL import Image


def make_jpegs(folder: str, n: int, size: tuple[int, int], seed: int = 0) -> tuple[str, str]:
    """n JPEGs of size (w, h) and a static mask (top third invalid) -> (manifest, mask)."""
    import skimage.data as sk

    rng = np.random.default_rng(seed)
    photos = [getattr(sk, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    w, h = size
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    names = []
    for i in range(n):
        a = photos[i % len(photos)]
        ch, cw = int(a.shape[0] * rng.uniform(0.6, 1.0)), int(a.shape[1] * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, a.shape[0] - ch + 1), rng.integers(0, a.shape[1] - cw + 1)
        crop = a[y:y + ch, x:x + cw][:, ::-1 if rng.random() < 0.5 else 1]
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BICUBIC)
        name = f"img/{i:05d}.jpg"
        img.save(os.path.join(folder, name), quality=90)
        names.append(name)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 3] = 255
    Image.fromarray(mask).save(os.path.join(folder, "mask.png"))
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w") as f:
        f.write("image\n" + "".join(f"{n}\n" for n in names))
    return manifest, os.path.join(folder, "mask.png")


def _spread(xs: list[float], nd: int = 3) -> dict:
    return {"min": round(min(xs), nd), "median": round(statistics.median(xs), nd), "max": round(max(xs), nd)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224, help="model input (square)")
    p.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off")
    p.add_argument("--workers", type=int, default=None, help="loader threads for e2e (default: run's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--variants", default="engine,process,e2e")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from camgate.bench import machine_info
    from camgate.data import device as gpu
    from camgate.data.batches import iter_batches
    from camgate.data.decode import MaskSpec, StaticMask
    from camgate.data.manifest import load_items
    from camgate.model.load import load_model, pick_device
    from camgate.runner.heatmaps import Runner, run

    dev = pick_device(args.device)
    machine = machine_info(dev)
    print(f"machine: {json.dumps(machine)}", file=sys.stderr)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    with tempfile.TemporaryDirectory(prefix="camgate-e2e-") as tmp:
        t = time.perf_counter()
        manifest, mask = make_jpegs(tmp, args.count, (w, h))
        print(f"{args.count} JPEGs {w}x{h} written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        card = os.path.join(tmp, "card.yaml")
        with open(card, "w") as f:
            yaml.safe_dump({"name": "e2e", "arch": f"torchvision/{args.arch}", "num_classes": 1000,
                            "input": {"size": [args.size, args.size]}}, f)
        models = {k: load_model(card, device=str(dev)) for k in names}  # one copy per variant
        items = load_items(manifest, mask)
        # compute-only inputs, decoded once outside the timing
        decoded = list(iter_batches(items, models[names[0]].input, MaskSpec(), args.batch_size,
                                    static_mask=StaticMask(mask)))
        runners = {k: Runner(models[k], amp=args.amp) for k in names if k in ("engine", "process")}
        fmt = runners["engine"].memory_format if "engine" in runners else torch.contiguous_format
        # already on the device: compute only
        stacked = [torch.stack([s.x for s in b]).to(dev).contiguous(memory_format=fmt) for b in decoded]
        out = os.path.join(tmp, "out.parquet")

        def engine():
            r = runners["engine"]
            for x in stacked:
                with gpu.autocast(dev, r.amp):
                    cb = r.engine(x)
                cb.cams.float().cpu()

        def process():
            for b in decoded:
                runners["process"].process(b)

        def e2e(name="e2e"):
            kw = {} if args.workers is None else {"workers": args.workers}
            if os.path.exists(out):
                os.remove(out)
            run(models[name], manifest, out, static_mask=mask, batch_size=args.batch_size, progress=False,
                checkpoint_rows=10**9, amp=args.amp, **kw)

        def e2e_overlap():
            budget = gpu.cpu_budget
            gpu.cpu_budget = lambda workers, device: (workers, True)  # the loading before the budget
            try:
                e2e("e2e_overlap")
            finally:
                gpu.cpu_budget = budget

        fns = {"engine": engine, "process": process, "e2e": e2e, "e2e_overlap": e2e_overlap}
        secs = {k: [] for k in names}
        cpu = {k: {"user": 0.0, "system": 0.0} for k in names}
        for r in range(args.warmup + args.rounds):
            k0 = r % len(names)
            for k in names[k0:] + names[:k0]:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0, c0 = time.perf_counter(), os.times()
                fns[k]()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt, c1 = time.perf_counter() - t0, os.times()
                if r >= args.warmup:
                    secs[k].append(dt)
                    cpu[k]["user"] += (c1.user - c0.user) / args.rounds
                    cpu[k]["system"] += (c1.system - c0.system) / args.rounds
            print(f"round {r + 1 - args.warmup}/{args.rounds}" if r >= args.warmup else "warm-up", file=sys.stderr)
    ips = {k: [args.count / s for s in v] for k, v in secs.items()}
    result = {"machine": machine, "arch": args.arch, "size": args.size, "images": args.count,
              "image_size": [w, h], "batch_size": args.batch_size, "amp": args.amp, "rounds": args.rounds,
              "order": "rotating", "model": "own copy per variant",
              "images_per_s": {k: _spread(v, 2) for k, v in ips.items()},
              "cpu_seconds_per_round": {k: {a: round(b, 2) for a, b in v.items()} for k, v in cpu.items()},
              "ratios": {f"{a}_over_engine": _spread([x / y for x, y in zip(ips[a], ips["engine"])])
                         for a in names if a != "engine" and "engine" in ips}}
    print(f"{args.arch} @ {args.size}px, {args.count} JPEGs {w}x{h}, batch {args.batch_size}, amp {args.amp}, "
          f"{dev}; {args.rounds} rounds (+{args.warmup} warm-up), own model copy per variant, rotating order")
    print("variant      img/s  min / median / max     CPU s/round user  system")
    for k in names:
        s = result["images_per_s"][k]
        print(f"  {k:9s} {s['min']:8.2f} {s['median']:8.2f} {s['max']:8.2f}     "
              f"{cpu[k]['user']:10.1f} {cpu[k]['system']:7.1f}")
    for k, q in result["ratios"].items():
        print(f"  {k:18s} per round {q['min']:.3f} .. {q['median']:.3f} .. {q['max']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
