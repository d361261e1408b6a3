"""``camgate`` command line: run, analyze, gate, bench, demo, compile.

Exit codes: 0 success (gate: passed, or failed without --fail-on-violation), 1 gate failed with
--fail-on-violation, 2 usage or input error (bad model card, data, policy, credentials...).
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_FAIL, EXIT_USAGE = 1, 2


def _mask_spec(args):
    from .data import MaskSpec

    return MaskSpec.parse(args.mask_marks_valid, args.invalid_ids)


def _add_mask_args(p):
    p.add_argument("--static-mask", help="one mask for every image (fixed camera)")
    p.add_argument("--mask-marks-valid", action="store_true", help="masks mark the VALID region")
    p.add_argument("--invalid-ids", help="label-map masks: comma-separated invalid label ids")
    p.add_argument("--topk", type=float, default=0.1, help="fraction of hottest pixels for topk_invalid_share")


def cmd_run(args) -> int:
    from . import runner

    s = runner.run(args.model, args.data, args.out, method=args.method, target=args.target,
                   target_layer=args.target_layer, static_mask=args.static_mask, mask_spec=_mask_spec(args),
                   batch_size=args.batch_size, device=args.device, workers=args.workers, topk=args.topk,
                   analyze=not args.heatmaps_only, policy=args.policy, progress=not args.quiet,
                   checkpoint_rows=args.checkpoint_rows)
    print(json.dumps(s.to_dict()))
    return 0


def cmd_analyze(args) -> int:
    from . import runner

    s = runner.analyze(args.heatmaps, args.out, data=args.data, static_mask=args.static_mask,
                       mask_spec=_mask_spec(args), topk=args.topk, progress=not args.quiet)
    print(json.dumps(s.to_dict()))
    return 0


def cmd_gate(args) -> int:
    from .gate import gate

    decision = gate(args.results, args.policy)
    print(json.dumps(decision.to_dict(), indent=None if args.compact else 2))
    return EXIT_FAIL if (args.fail_on_violation and not decision.passed) else 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_demo(args) -> int:
    from .demo.main import main as demo_main

    return demo_main(args)


def cmd_compile(args) -> int:
    from .kfp.compile import compile_all

    for path in compile_all(args.root):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="camgate", description="Heatmap test gates for vision models.")
    p.add_argument("--version", action="version", version=f"camgate {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="compute heatmaps and invalid-pixel metrics -> results Parquet")
    r.add_argument("--model", required=True, help="model card (YAML/JSON, local or s3://)")
    r.add_argument("--data", required=True, help="manifest (csv/jsonl/parquet) or prefix with images/ + masks/")
    r.add_argument("--out", required=True, help="results Parquet (local or s3://)")
    r.add_argument("--method", default="gradcam")
    r.add_argument("--target-layer", action="append", help="dotted module path (repeat for several)")
    r.add_argument("--target", default="predicted", help="predicted | label | <class index>")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    r.add_argument("--workers", type=int, default=4, help="threads fetching and decoding images")
    r.add_argument("--heatmaps-only", action="store_true", help="skip masks and metrics (see 'analyze')")
    r.add_argument("--policy", help="policy to record in the results' metadata")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--checkpoint-rows", type=int, default=256,
                   help="commit rows every N rows; re-running after a crash resumes from there")
    _add_mask_args(r)
    r.set_defaults(fn=cmd_run)

    a = sub.add_parser("analyze", help="heatmaps Parquet + masks -> results Parquet")
    a.add_argument("heatmaps")
    a.add_argument("--out", required=True)
    a.add_argument("--data", help="manifest to take masks from (row by row)")
    a.add_argument("--quiet", action="store_true")
    _add_mask_args(a)
    a.set_defaults(fn=cmd_analyze)

    g = sub.add_parser("gate", help="results + policy -> decision (JSON on stdout)")
    g.add_argument("results")
    g.add_argument("--policy", required=True)
    g.add_argument("--fail-on-violation", action="store_true", help="exit 1 when the gate fails")
    g.add_argument("--compact", action="store_true", help="one-line JSON")
    g.set_defaults(fn=cmd_gate)

    b = sub.add_parser("bench", help="benchmark: inference vs camgate vs pytorch-grad-cam, side by side")
    from .bench import add_args

    add_args(b)
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("demo", help="the end-to-end demo pipeline on an embedded S3 server")
    d.add_argument("--workdir", default=".cache/demo", help="cache for data, models and outputs")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compile", help="regenerate components/ and pipelines/ YAML")
    c.add_argument("--root", default=".", help="repository root")
    c.set_defaults(fn=cmd_compile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .cam import MethodError
    from .data import DataError
    from .gate import PolicyError, ResultsError
    from .modelspec import ModelCardError
    from .storage import StorageError

    try:
        return args.fn(args)
    except (ModelCardError, MethodError, DataError, PolicyError, ResultsError, StorageError, ValueError) as e:
        print(f"camgate {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
