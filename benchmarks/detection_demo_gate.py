"""Where the demo detectors' per-detection Grad-CAMs rest: invalid activation ratio per variant, class
and target layer (this decides the detection demo's gate policy).

For each variant (clean / shortcut) the detector of :func:`camgate.demo.detect.train_detector` (trained
here, or taken from the cache) runs on its test set; ``DetectionCamEngine(model, [layer], "gradcam")``
explains (a) every detection with score >= ``--score`` (``det``; ``det_tp``: those of them that find
their object, IoU >= 0.5 and the right class) and (b) every ground-truth box (``gt``: the engine finds
the output that matches it by IoU > 0.5 and label; no match: an all-zero map, counted as unmatched).
Each map's invalid activation ratio (share of heat on walls/ceiling, ``camgate.metrics.invalid``) is
summarised per class: number of maps, mean ratio, share of maps over 0.5; plus the detection quality
(AP50, recall / precision at IoU 0.5 and score >= ``--score``). The invalid pixels are ~51% of the image:
a flat map scores ~0.51. The last line is one JSON object with every figure.

    python benchmarks/detection_demo_gate.py --cache DIR [--layers backbone.body.layer4 backbone.body.layer3]
        [--methods gradcam hirescam] [--score 0.3] [--batch 8] [--threads 2] [--config '{"epochs": 3}']
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from camgate.cam.detection import DetectionCamEngine
from camgate.demo import detect, synth
from camgate.metrics.invalid import invalid_metrics


def measure(model, x, targets, layer: str, score_min: float, batch: int, method: str = "gradcam") -> dict:
    """Per-detection invalid ratios of one detector on uint8 images ``x`` with ground truth ``targets``."""
    engine = DetectionCamEngine(model, [layer], method=method)
    mask = torch.from_numpy(synth.invalid_mask(tuple(x.shape[-2:])) > 0)
    rows = {"det": [], "gt": []}  # (class index, ratio or NaN, true positive)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        imgs = x[i:i + batch].float() / 255.0
        tg = targets[i:i + batch]
        own = engine(imgs)
        with torch.no_grad():
            outs = [{"boxes": m.boxes, "labels": m.labels, "scores": m.scores} for m in own]
        hits = detect.match(outs, tg)
        gt = engine(imgs, detections=[{"boxes": t["boxes"], "labels": t["labels"]} for t in tg])
        for kind, res in (("det", own), ("gt", gt)):
            for j, m in enumerate(res):
                keep = (m.scores >= score_min) if kind == "det" else torch.ones(len(m), dtype=torch.bool)
                if not keep.any():
                    continue
                maps = m.maps[keep].cpu()
                met = invalid_metrics(list(maps), [mask] * len(maps)).rows()
                labels = m.labels[keep].tolist()
                tps = [hits[j][d] >= 0 for d in keep.nonzero()[:, 0].tolist()] if kind == "det" else \
                    [v > 0 for v in m.targets[keep].tolist()]
                rows[kind] += [(c, r["invalid_activation_ratio"], tp) for c, r, tp in zip(labels, met, tps)]
    seconds = time.perf_counter() - t0
    rows["det_tp"] = [r for r in rows["det"] if r[2]]  # the detections that found their object
    summary = {}
    for kind, rs in rows.items():
        for c in range(1, len(detect.DET_CLASSES)):
            sel = [(r, tp) for cc, r, tp in rs if cc == c]
            vals = np.array([r for r, _ in sel if not np.isnan(r)])
            summary[f"{kind}/{detect.DET_CLASSES[c]}"] = {
                "n": len(sel), "matched" if kind == "gt" else "tp": sum(bool(tp) for _, tp in sel),
                "mean": round(float(vals.mean()), 3) if len(vals) else None,
                "share_over_0.5": round(float((vals > 0.5).mean()), 3) if len(vals) else None}
        vals = np.array([r for _, r, _ in rs if not np.isnan(r)])
        summary[f"{kind}/all"] = {"n": len(rs), "mean": round(float(vals.mean()), 3) if len(vals) else None,
                                  "share_over_0.5": round(float((vals > 0.5).mean()), 3) if len(vals) else None}
    summary["seconds"] = round(seconds, 1)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="the demo cache (models are trained there when missing)")
    ap.add_argument("--layers", nargs="+", default=[detect.TARGET_LAYER, "backbone.body.layer3"])
    ap.add_argument("--variants", nargs="+", default=list(synth.VARIANTS))
    ap.add_argument("--methods", nargs="+", default=["gradcam"])
    ap.add_argument("--score", type=float, default=detect.SCORE_MIN)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="{}", help="DetConfig fields as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(detect.DetConfig(), **json.loads(args.config))
    result = {"config": json.loads(args.config), "score_min": args.score, "figures": {}}
    print(f"{'variant':9} {'method':8} {'layer':22} {'maps':6} {'class':11} {'n':>4} {'tp':>4} {'mean':>6} {'>0.5':>6}")
    for variant in args.variants:
        card = detect.train_detector(variant, args.cache, seed=args.seed, config=config, log=print)
        metrics = json.loads((card.parent / "metrics.json").read_text())
        model = detect.load_detector(card)
        x, targets = detect.load_manifest((card.parent / metrics["data"]).resolve())
        fig = result["figures"][variant] = {"quality": metrics["test"], "train_seconds": metrics["train_seconds"]}
        q = metrics["test"]
        print(f"{variant}: train {metrics['train_seconds']} s, mAP50 {q['map50']} AP50 {q['ap50']}, recall "
              f"{q['recall']}, precision {q['precision']}, detections on empty scenes {q['empty_scene_detections']}")
        for method in args.methods:
            for layer in args.layers:
                s = fig[f"{method}/{layer}"] = measure(model, x, targets, layer, args.score, args.batch, method)
                for k, v in s.items():
                    if k == "seconds":
                        continue
                    kind, cls = k.split("/")
                    tp = v.get("tp", v.get("matched", ""))
                    print(f"{variant:9} {method:8} {layer:22} {kind:6} {cls:11} {v['n']:>4} {tp:>4} "
                          f"{v['mean']!s:>6} {v['share_over_0.5']!s:>6}")
                print(f"{variant:9} {method:8} {layer:22} maps in {s['seconds']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
