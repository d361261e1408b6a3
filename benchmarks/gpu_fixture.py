"""Inputs for ``benchmarks/amp_effect.py`` in ``benchmarks/gpu.sh``: JPEGs, a static mask, a manifest and
a model card (torchvision architecture, random weights), written into one folder.

    python benchmarks/gpu_fixture.py DIR [--count 200] [--image-size 640x480] [--arch resnet50] [--size 224]

Prints ``--model CARD --data MANIFEST --static-mask MASK`` (the arguments amp_effect.py takes).
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_bench import make_jpegs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224, help="model input (square)")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    os.makedirs(args.dir, exist_ok=True)
    manifest, mask = make_jpegs(args.dir, args.count, (w, h))
    card = os.path.join(args.dir, "card.yaml")
    with open(card, "w") as f:
        yaml.safe_dump({"name": "gpu-fixture", "arch": f"torchvision/{args.arch}", "num_classes": 1000,
                        "input": {"size": [args.size, args.size]}}, f)
    print(f"--model {card} --data {manifest} --static-mask {mask}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
