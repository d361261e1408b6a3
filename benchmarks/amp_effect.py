"""What mixed precision (``camgate run --amp``) changes in the results: the same model and data run
at full precision and with autocast, compared row by row.

Figures: max |delta| of the raw maps (absolute, and relative to each map's peak), of
``invalid_activation_ratio`` and of the run's mean ratio; predictions that change; per-image verdicts
that flip at the policy's per-image ratio threshold (``share_images_over.ratio``, else --threshold);
rule verdicts and the gate decision with and without autocast; and the wall time of each run.
bf16 autocast also runs on the CPU; fp16 needs a GPU for speed (it runs, slowly, on CPU too).

    python benchmarks/amp_effect.py --model CARD --data MANIFEST [--static-mask M] [--policy P] \\
        [--amp bf16] [--device cpu] [--batch-size 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--static-mask")
    p.add_argument("--policy", help="policy YAML/JSON: gate decisions are compared")
    p.add_argument("--threshold", type=float, default=0.5, help="per-image ratio threshold without a policy")
    p.add_argument("--amp", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", default="16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--method", default="gradcam")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from camgate.gating.decision import evaluate
    from camgate.gating.policy import load_policy
    from camgate.io import results
    from camgate.runner.heatmaps import run

    threshold = args.threshold
    policy = load_policy(args.policy) if args.policy else None
    if policy is not None:
        threshold = float(policy.share_ratio)
    out, secs = {}, {}
    with tempfile.TemporaryDirectory(prefix="camgate-amp-") as tmp:
        for amp in ("off", args.amp):
            t = time.perf_counter()
            path = run(args.model, args.data, os.path.join(tmp, f"{amp}.parquet"), static_mask=args.static_mask,
                       device=args.device, batch_size=args.batch_size, amp=amp, method=args.method,
                       progress=False).out
            secs[amp] = round(time.perf_counter() - t, 2)
            out[amp] = pq.read_table(path)
        ref, got = out["off"].to_pylist(), out[args.amp].to_pylist()
        d_map, d_rel, d_ratio, pred_changed, flips, compared = 0.0, 0.0, 0.0, 0, 0, 0
        for a, b in zip(ref, got):
            if a["cam"] is None or b["cam"] is None:
                continue
            ma, mb = results.cam_array(a), results.cam_array(b)
            d = float(np.abs(ma - mb).max())
            d_map = max(d_map, d)
            d_rel = max(d_rel, d / max(float(ma.max()), 1e-12))
            pred_changed += a["predicted_class"] != b["predicted_class"]
            ra, rb = a.get("invalid_activation_ratio"), b.get("invalid_activation_ratio")
            if ra is not None and rb is not None and np.isfinite(ra) and np.isfinite(rb):
                compared += 1
                d_ratio = max(d_ratio, abs(ra - rb))
                flips += (ra > threshold) != (rb > threshold)
        mean = {k: float(np.nanmean(np.array(t.column("invalid_activation_ratio").to_pylist(), dtype=float)))
                for k, t in out.items()}
        report = {"amp": args.amp, "device": args.device, "rows": len(ref), "rows_compared": compared,
                  "seconds": secs, "max_abs_delta_map": d_map, "max_rel_delta_map": d_rel,
                  "max_abs_delta_ratio": d_ratio, "mean_ratio": mean,
                  "mean_ratio_delta": mean[args.amp] - mean["off"], "predictions_changed": pred_changed,
                  "per_image_threshold": threshold, "per_image_verdict_flips": flips}
        if policy is not None:
            dec = {k: evaluate(t, policy) for k, t in out.items()}
            report["gate_passed"] = {k: d.passed for k, d in dec.items()}
            pairs = zip(dec["off"].rules, dec[args.amp].rules)
            report["rule_verdict_flips"] = [f"{r.rule} ({r.scope})" for r, q in pairs
                                            if r.verdict != q.verdict]
            report["rule_values"] = {f"{r.rule} ({r.scope})": [r.value, q.value]
                                     for r, q in zip(dec["off"].rules, dec[args.amp].rules)}
    print(f"amp {args.amp} vs off on {args.device}: {len(ref)} rows ({compared} with ratios), "
          f"{secs['off']} s vs {secs[args.amp]} s")
    print(f"  max |delta| map {d_map:.3e} (relative to the map's peak {d_rel:.3e}), ratio {d_ratio:.3e}, "
          f"mean ratio {report['mean_ratio_delta']:+.3e}")
    print(f"  predictions changed {pred_changed}, per-image verdicts flipped at {threshold}: {flips}")
    if policy is not None:
        print(f"  gate passed: off {report['gate_passed']['off']}, {args.amp} {report['gate_passed'][args.amp]}; "
              f"rule verdicts flipped: {report['rule_verdict_flips'] or 'none'}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
