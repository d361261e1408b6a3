"""``camgate`` command line: run, analyze, shard, merge, gate, report, promote, bench, demo, compile (and more:
``camgate -h``).

Exit codes: 0 success (gate: passed, or failed without --fail-on-violation), 1 gate failed with
--fail-on-violation (promote: the record says the gate failed, nothing copied), 2 usage or input
error (bad model card, data, policy, option, credentials, a promotion refused...: every error
camgate states for the user), 3 internal error (a bug: the message says so; ``--debug``
or ``CAMGATE_DEBUG=1`` prints the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3


def _mask_spec(args):
    """The mask options, or None when none was given (``analyze`` then keeps the heatmaps' own)."""
    from .data.decode import MaskSpec

    if not (args.mask_marks_valid or args.invalid_ids):
        return None
    return MaskSpec.parse(args.mask_marks_valid, args.invalid_ids)


def _add_model_data_out(p, out_help: str):
    p.add_argument("--model", required=True, help="model card (YAML/JSON, local or s3://)")
    p.add_argument("--data", required=True, help="manifest (csv/jsonl/parquet) or prefix with images/ (+ masks/)")
    p.add_argument("--out", required=True, help=out_help)


def cmd_run(args) -> int:
    from . import runner
    from .data.decode import MaskSpec

    s = runner.run(args.model, args.data, args.out, method=args.method, target=args.target,
                   target_layer=args.target_layer, static_mask=args.static_mask,
                   mask_spec=_mask_spec(args) or MaskSpec(), batch_size=args.batch_size, device=args.device,
                   workers=args.workers, topk=args.topk, analyze=not args.heatmaps_only, policy=args.policy,
                   progress=not args.quiet, checkpoint_rows=args.checkpoint_rows, checkpoint=args.checkpoint,
                   budget=args.budget, seed=args.seed, amp=args.amp, decode=args.decode,
                   score_threshold=args.score_threshold, annotations=args.annotations, classes=args.classes)
    print(json.dumps(s.to_dict()))
    return 0


def cmd_layers(args) -> int:
    from . import runner
    from .data.decode import MaskSpec

    s = runner.run_layers(args.model, args.data, args.out, layers=args.layers, method=args.method,
                          target=args.target, static_mask=args.static_mask,
                          mask_spec=_mask_spec(args) or MaskSpec(), batch_size=args.batch_size,
                          device=args.device, workers=args.workers, topk=args.topk, progress=not args.quiet)
    print(json.dumps(s.to_dict()))
    return 0


def cmd_animate(args) -> int:
    from .report.animate import animate_image

    paths = animate_image(args.model, args.image, args.out, mask=args.mask, layers=args.layers,
                          method=args.method, target=args.target, norm=args.norm, fps=args.fps,
                          mask_spec=_mask_spec(args), device=args.device)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_road(args) -> int:
    from . import runner
    from .errors import ConfigError

    try:
        percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()] if args.percentiles else None
    except ValueError:
        raise ConfigError(f"--percentiles must be comma-separated numbers, got {args.percentiles!r}") from None
    s = runner.run_road(args.model, args.data, args.out, method=args.method, layers=args.layers,
                        percentiles=percentiles, sample=args.sample, seed=args.seed, target=args.target,
                        batch_size=args.batch_size, device=args.device, workers=args.workers,
                        sanity=args.sanity, progress=not args.quiet)
    out = s.to_dict()
    if args.plot:
        from .io import results
        from .report.plots import ybroad_png

        layers = results.read_table(args.layers_file) if args.layers_file else None
        ybroad_png(results.read_table(args.out), args.plot, layers)
        out["plot"] = args.plot
    print(json.dumps(out))
    return 0


def cmd_analyze(args) -> int:
    from . import runner

    s = runner.analyze(args.heatmaps, args.out, data=args.data, static_mask=args.static_mask,
                       mask_spec=_mask_spec(args), topk=args.topk, progress=not args.quiet)
    print(json.dumps(s.to_dict()))
    return 0


def _write_artifacts(files: dict, wanted: dict) -> None:
    from .io import storage

    for name, path in wanted.items():
        if path:
            storage.write_bytes(path, files[name])


def cmd_gate(args) -> int:
    from .report import artifacts

    decision, files = artifacts(args.results, args.policy, road=args.road, baseline=args.baseline,
                                images=bool(args.report))
    _write_artifacts(files, {"report.html": args.report, "record.json": args.record, "junit.xml": args.junit,
                             "summary.md": args.markdown})
    print(json.dumps(decision.to_dict(), indent=None if args.compact else 2))
    return EXIT_FAIL if (args.fail_on_violation and not decision.passed) else 0


def cmd_report(args) -> int:
    from .io.results import run_metadata
    from .report import artifacts

    # the policy the results were run with, else the default rules: a report needs a verdict to explain
    policy = args.policy or run_metadata(args.results).get("policy") or {"name": "default"}
    decision, files = artifacts(args.results, policy, road=args.road, baseline=args.baseline)
    _write_artifacts(files, {"report.html": args.out, "summary.md": args.markdown, "record.json": args.record})
    print(f"{'PASS' if decision.passed else 'FAIL'}: report written to {args.out}")
    return 0


def cmd_promote(args) -> int:
    from .errors import ConfigError
    from .promote import promote

    if not args.to:  # the library reads '' as "report only", which is no promotion
        raise ConfigError("--to must name a local folder or an s3:// prefix")
    out = promote(args.model, args.record, args.to, registry=args.registry, author=args.author)
    print(json.dumps(out))
    # a refused promotion is a verdict, like a failed gate: nothing was copied
    return 0 if out["promoted"] else EXIT_FAIL


def cmd_shard(args) -> int:
    from .runner.shards import plan

    print(json.dumps(plan(args.data, args.shards, args.out, static_mask=args.static_mask)))
    return 0


def cmd_merge(args) -> int:
    from .runner.shards import merge

    print(json.dumps(merge(args.parts, args.out, data=args.data)))
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_demo(args) -> int:
    from .demo.main import main as demo_main

    return demo_main(args)


def cmd_compile(args) -> int:
    from .kfp.compile import compile_all

    kw = {} if args.parallelism is None else {"parallelism": args.parallelism}
    for path in compile_all(args.root, **kw):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``camgate`` parser; the run settings' options come from :mod:`camgate.settings`."""
    from . import __version__, settings

    p = argparse.ArgumentParser(prog="camgate", description="Heatmap test gates for vision models.")
    p.add_argument("--version", action="version", version=f"camgate {__version__}")
    p.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="compute heatmaps and invalid-pixel metrics -> results Parquet")
    _add_model_data_out(r, "results Parquet (local or s3://)")
    r.add_argument("--heatmaps-only", action="store_true", help="skip masks and metrics (see 'analyze')")
    r.add_argument("--policy", help="policy to record in the results' metadata")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    settings.add_arguments(r, "run")
    r.set_defaults(fn=cmd_run)

    lay = sub.add_parser("layers", help="every layer's map in one pass per batch -> layers Parquet")
    _add_model_data_out(lay, "layers Parquet: one row per (image, layer)")
    lay.add_argument("--quiet", action="store_true")
    settings.add_arguments(lay, "layers")
    lay.set_defaults(fn=cmd_layers)

    an = sub.add_parser("animate", help="one image's maps through every layer: MP4, GIF, contact sheet, Parquet")
    an.add_argument("--model", required=True, help="model card (YAML/JSON, local or s3://)")
    an.add_argument("--image", required=True, help="image URI (local or s3://)")
    an.add_argument("--mask", help="its invalid-pixel mask, outlined on every frame")
    an.add_argument("--out", required=True, help="local folder for layers.mp4, layers.gif, contact_sheet.png, "
                                                 "layers.json and layers.parquet")
    settings.add_arguments(an, "animate")
    an.set_defaults(fn=cmd_animate)

    rd = sub.add_parser("road", help="ROAD faithfulness of the heatmaps (per layer: ybROAD) -> ROAD Parquet")
    _add_model_data_out(rd, "ROAD Parquet: one row per (image, layer)")
    rd.add_argument("--plot", help="write the ybROAD curve (and, with --layers-file, the per-layer invalid "
                                   "activation) as a PNG here")
    rd.add_argument("--layers-file", help="a `camgate layers` Parquet of the same images, for the plot")
    rd.add_argument("--quiet", action="store_true")
    settings.add_arguments(rd, "road")
    rd.set_defaults(fn=cmd_road)

    a = sub.add_parser("analyze", help="heatmaps Parquet + masks -> results Parquet")
    a.add_argument("heatmaps")
    a.add_argument("--out", required=True)
    a.add_argument("--data", help="manifest to take masks from (paired by row and image); "
                                  "default: the masks recorded in the heatmaps file")
    a.add_argument("--quiet", action="store_true")
    settings.add_arguments(a, "analyze")
    a.set_defaults(fn=cmd_analyze)

    g = sub.add_parser("gate", help="results + policy -> decision (JSON on stdout)")
    g.add_argument("results")
    g.add_argument("--policy", required=True)
    g.add_argument("--road", help="ROAD results (camgate road) for the policy's faithfulness rule")
    g.add_argument("--baseline", help="the champion's results on the same data, for the baseline rules")
    g.add_argument("--report", help="write the HTML report here")
    g.add_argument("--markdown", help="write the Markdown summary here")
    g.add_argument("--record", help="write the test record (record.json) here")
    g.add_argument("--junit", help="write JUnit XML (one test case per rule and scope) here")
    g.add_argument("--fail-on-violation", action="store_true", help="exit 1 when the gate fails")
    g.add_argument("--compact", action="store_true", help="one-line JSON")
    g.set_defaults(fn=cmd_gate)

    rp = sub.add_parser("report", help="results -> HTML report (and Markdown, record) for a reviewer")
    rp.add_argument("results")
    rp.add_argument("--out", required=True, help="the HTML report")
    rp.add_argument("--policy", help="policy YAML (default: the one the run recorded, else the default rules)")
    rp.add_argument("--baseline", help="the champion's results on the same data")
    rp.add_argument("--road", help="ROAD results (camgate road)")
    rp.add_argument("--markdown", help="also write the Markdown summary here")
    rp.add_argument("--record", help="also write the test record here")
    rp.set_defaults(fn=cmd_report)

    pr = sub.add_parser("promote", help="copy a model that passed its gate, with its test record, to a promotion "
                                        "location (and register it)")
    pr.add_argument("--model", required=True, help="model card (YAML/JSON, local or s3://)")
    pr.add_argument("--record", required=True, help="the gate's test record (record.json)")
    pr.add_argument("--to", required=True, help="promotion location (local folder or s3:// prefix)")
    pr.add_argument("--registry", help="Kubeflow Model Registry: HOST:PORT (plain HTTP) or https://HOST[:PORT]")
    pr.add_argument("--author", default="camgate", help="author recorded in the Model Registry")
    pr.set_defaults(fn=cmd_promote)

    sh = sub.add_parser("shard", help="split a data set into N shard manifests (prints their URIs as JSON)")
    sh.add_argument("data", help="manifest (csv/jsonl/parquet) or prefix with images/ (+ masks/)")
    sh.add_argument("--shards", required=True, type=int, help="number of shards (contiguous rows, sizes within one)")
    sh.add_argument("--out", required=True, help="folder or prefix (local or s3://) for shard-K-of-N.parquet")
    settings.add_arguments(sh, "shard")
    sh.set_defaults(fn=cmd_shard)

    mg = sub.add_parser("merge", help="shard results -> one results Parquet in manifest order")
    mg.add_argument("parts", nargs="+", help="results Parquet of each shard")
    mg.add_argument("--out", required=True, help="merged results Parquet (local or s3://)")
    mg.add_argument("--data", help="the full data set: the parts must cover its rows exactly, same images")
    mg.set_defaults(fn=cmd_merge)

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
    c.add_argument("--parallelism", type=int, help="heatmap-gate: shards computed at once, fixed at compile time "
                                                   "by KFP (0 = no limit; default: DEFAULT_PARALLELISM of "
                                                   "camgate.kfp.pipelines)")
    c.set_defaults(fn=cmd_compile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .errors import CamgateError

    try:
        return args.fn(args)
    except CamgateError as e:  # a problem camgate states for the user
        print(f"camgate {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - anything else is a bug, and must not read as a verdict or a usage error
        if args.debug or os.environ.get("CAMGATE_DEBUG"):
            traceback.print_exc()
        print(f"camgate {args.cmd}: internal error (a bug in camgate, please report it): {type(e).__name__}: {e}"
              f"{'' if args.debug else ' (run with --debug for the traceback)'}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
