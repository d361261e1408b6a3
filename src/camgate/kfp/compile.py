"""Compile the components and the pipeline to the YAML checked in under components/ and pipelines/.

Output is deterministic (same camgate, kfp and ``CAMGATE_IMAGE_REGISTRY`` -> same bytes), so CI
can recompile and compare to catch stale files.
"""
import os
import tempfile

from kfp import compiler

from .components import COMPONENTS
from .pipelines import heatmap_gate

PIPELINES = {"heatmap_gate": heatmap_gate}


def _compile(obj, path: str) -> None:
    # compile beside the target and rename: a failed compile never leaves half a file
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".compile-", suffix=".yaml")
    os.close(fd)
    try:
        compiler.Compiler().compile(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compile_all(root: str = ".") -> list[str]:
    """Write ``components/<name>.yaml`` and ``pipelines/<name>.yaml`` under ``root``; return the paths."""
    written = []
    for folder, items in (("components", COMPONENTS), ("pipelines", PIPELINES)):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name, obj in items.items():
            path = os.path.join(root, folder, f"{name}.yaml")
            _compile(obj, path)
            written.append(path)
    return written
