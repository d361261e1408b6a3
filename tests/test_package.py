"""The package's shape: lint-clean, and no import cycle among its modules."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "camgate"


def _ruff() -> str:
    exe = Path(sys.executable).with_name("ruff")
    return str(exe) if exe.exists() else (shutil.which("ruff") or "")


def test_ruff_is_clean():
    ruff = _ruff()
    if not ruff:
        pytest.fail("ruff is a test dependency (pip install -e '.[test]')")
    p = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """camgate module -> the camgate modules it imports, inside functions too: a lazy import hides a
    cycle from the interpreter but the two modules still depend on each other."""
    paths = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in paths else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        # importing a.b.c imports the packages a and a.b first, unless they are this module's own
        # (already being imported when it runs)
        graph[mod] = {d for dep in deps if dep in paths for d in _with_parents(dep)
                      if d != mod and not mod.startswith(d + ".")}
    return graph


def _with_parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def test_no_import_cycle():
    graph = import_graph()
    assert "camgate.cam" in graph["camgate.runner.classifier"] and "camgate.cam.maps" in graph["camgate.cam.engine"]
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above must be able to fail: a two-module cycle is found."""
    graph = {"camgate.a": {"camgate.b"}, "camgate.b": {"camgate.a"}}
    graph.update({"camgate.runner.classifier": {"camgate.cam"}, "camgate.cam.engine": {"camgate.cam.maps"},
                  "camgate.cam": set(), "camgate.cam.maps": set()})
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(AssertionError, match="camgate.a -> camgate.b -> camgate.a"):
        test_no_import_cycle()
