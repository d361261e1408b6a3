"""Per-detection maps for every detection of a batch: camgate's DetectionCamEngine vs pytorch-grad-cam.

Variants, each on its own copy of the detector (pytorch-grad-cam's hooks stay registered on the model
it was given; a shared model would make every other variant pay for them):

- **camgate**: ``DetectionCamEngine(model)`` on the whole batch: one forward, one backward per
  detection rank (the k-th detections of all images together), frozen parameters, sparse RoIAlign
  backward;
- **camgate(per-det)**: the same engine with ``batch_images=False``: one backward per detection;
- **pytorch-grad-cam**: ``GradCAM`` + ``FasterRCNNBoxScoreTarget([label], [box])`` called once per
  detection on its image alone (forward + backward each), trainable parameters, as users run it; the
  boxes are those of one plain forward of each image (untimed, as a user's detections would be).

One untimed warm-up round, then the order rotates every round. Figures: seconds per batch, min /
median / max per variant, and the ratio pytorch-grad-cam / variant as the ratio of medians and the
min / median / max of the per-round ratios. The first round also checks that the maps agree (max
deviation after min-max at input resolution). The last line is one JSON object with every figure.

    python benchmarks/detection_bench.py [--arch fasterrcnn_resnet50_fpn] [--batch 2] [--dets 5]
        [--size 160] [--rounds 3] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torchvision.models import detection as D

from camgate.cam import DetectionCamEngine, normalized


def build(args):
    torch.manual_seed(0)
    common = dict(weights=None, weights_backbone=None, num_classes=args.classes, min_size=args.size,
                  max_size=args.size)  # no internal upscaling to 800 px, no padding (size % 32 == 0)
    if args.arch.startswith("fasterrcnn"):
        m = getattr(D, args.arch)(**common, box_score_thresh=0.0, box_detections_per_img=args.dets)
        with torch.no_grad():  # random heads saturate the softmax (scores 1.0, gradients ~1e-7): soften
            m.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
    else:
        m = getattr(D, args.arch)(**common, score_thresh=0.0, detections_per_img=args.dets)
    return m.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="fasterrcnn_resnet50_fpn")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dets", type=int, default=5, help="detections per image (threshold 0)")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = build(args).to(args.device)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(args.device)
    layer_name = [n for n, m in base.named_modules() if m is list(base.backbone.body.children())[-1]][0]

    ours_model = copy.deepcopy(base).requires_grad_(False)
    perdet_model = copy.deepcopy(base).requires_grad_(False)
    ref_model = copy.deepcopy(base).requires_grad_(True)
    ours = DetectionCamEngine(ours_model)
    perdet = DetectionCamEngine(perdet_model, batch_images=False)
    ref_cam = GradCAM(ref_model, [dict(ref_model.named_modules())[layer_name]])
    with torch.no_grad():  # the user's detections: one plain forward of each image
        own = [ref_model(x[i:i + 1])[0] for i in range(args.batch)]
    n_dets = sum(len(o["boxes"]) for o in own)

    def reference():
        return [[ref_cam(x[i:i + 1], targets=[FasterRCNNBoxScoreTarget([lab], [b])])[0]
                 for b, lab in zip(o["boxes"], o["labels"])] for i, o in enumerate(own)]

    variants = {"camgate": lambda: ours(x), "camgate(per-det)": lambda: perdet(x), "pytorch-grad-cam": reference}
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    out = {}
    for r in range(args.rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            out[n] = variants[n]()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if r:  # round 0: warm-up
                times[n].append(time.perf_counter() - t)
        if r == 0:  # the maps agree: each reference detection against ours by box and label
            dev = 0.0
            for i, o in enumerate(own):
                res = out["camgate"][i]
                for d, (b, lab) in enumerate(zip(o["boxes"], o["labels"])):
                    iou = torchvision.ops.box_iou(b[None], res.boxes)[0]
                    j = int(iou.argmax())
                    assert iou[j] > 0.99 and res.labels[j] == lab, "a reference detection has no match"
                    got = normalized(res.maps[j:j + 1], (args.size, args.size))[0].cpu().numpy()
                    dev = max(dev, float(np.abs(out["pytorch-grad-cam"][i][d] - got).max()))
    load = os.getloadavg()
    summary = {n: {"min": min(v), "median": statistics.median(v), "max": max(v)} for n, v in times.items()}
    ref = times["pytorch-grad-cam"]
    ratios = {}
    print(f"{args.arch}, batch {args.batch}, {n_dets} detections, {args.size}x{args.size}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {load[0]:.2f}")
    print(f"max deviation of the maps from pytorch-grad-cam's (min-max, input resolution): {dev:.2e}")
    print(f"{'variant':<18} {'min s':>8} {'median s':>9} {'max s':>8}   pytorch-grad-cam / variant")
    for n in names:
        s = summary[n]
        per_round = [a / b for a, b in zip(ref, times[n])]
        ratios[n] = {"of_medians": statistics.median(ref) / s["median"], "per_round_min": min(per_round),
                     "per_round_median": statistics.median(per_round), "per_round_max": max(per_round)}
        q = ratios[n]
        print(f"{n:<18} {s['min']:8.2f} {s['median']:9.2f} {s['max']:8.2f}   {q['of_medians']:.2f}x "
              f"(per round {q['per_round_min']:.2f} .. {q['per_round_median']:.2f} .. {q['per_round_max']:.2f})")
    print(json.dumps({"arch": args.arch, "device": args.device, "batch": args.batch, "detections": n_dets,
                      "size": args.size,
                      "rounds": args.rounds, "threads": torch.get_num_threads(), "load_average": load,
                      "max_deviation": dev, "seconds": summary, "ratios": ratios, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
