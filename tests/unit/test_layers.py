"""The layers stay layers: the core imports no trio and no sockets, no module
imports another in a circle (not even lazily), and each layer imports only the
layers beneath it (docs/ARCHITECTURE.md draws them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "repeld"

#: What each layer may import of repeld, besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core", "cache.spec"},
    "cache": {"core", "config.errors"},
    # The metric definitions and their exposition: pure, no trio (shell/metrics_http serves them).
    "metrics": {"core"},
    "shell": {
        "core",
        "metrics",
        "config",
        "cache",
        "service.tcptune",
        "service.listeners",
        "service.capacity",
    },
    # Process primitives: they never import the shell, which uses them.
    "service": {"core", "config"},
    # The process top: start-up, signals, the --workers parent; it assembles the rest.
    "process": {"core", "config", "cache", "metrics", "shell", "service"},
    # The report reads events back by the vocabulary events.py writes them with,
    # and groups clients as repeld's rules see their addresses.
    "report": {"core.names", "core.addresses"},
    "cli": {"core", "config", "cache", "shell", "service", "process", "report"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every repeld module `name` imports, anywhere in the file (lazy and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from repeld.core import events` imports the submodule events.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "repeld" or target.startswith("repeld."):
                while target not in MODULES:  # repeld._tcpnative and the like
                    target = target.rpartition(".")[0]
                if target != name:
                    yield target


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_the_layers() -> None:
    assert "repeld.core.hold" in MODULES
    assert "repeld.core.hold" in GRAPH["repeld.core.policy"]
    assert "repeld.shell.pen" in GRAPH["repeld.shell.server"]


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in GRAPH[module]:
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module)


def _allowed(module: str, dep: str) -> bool:
    layer, target = _layer(module), _layer(dep)
    if target in ("", layer) or dep == "repeld._tcpnative":
        return True  # the package itself (__version__), the same layer, the native module
    rest = dep.removeprefix("repeld.")
    return any(rest == a or rest.startswith(a + ".") for a in ALLOWED.get(layer, set()))


def test_each_layer_imports_only_what_is_beneath_it() -> None:
    wrong = [
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        for dep in deps
        if not _allowed(module, dep)
    ]
    assert wrong == []


def test_the_core_pulls_in_no_trio_and_no_sockets() -> None:
    core = sorted(m for m in MODULES if m.startswith("repeld.core"))
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in ('trio', 'socket', 'select', 'netaddr', 'cffi') "
        "if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(SRC)!r})\n" + code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == ""
    assert len(core) >= 7  # the package and its modules were all imported


def test_the_report_pulls_in_no_trio_and_no_sockets() -> None:
    # Its parsing, counting and drawing; main.py reads the files around them.
    report = sorted(
        m for m in MODULES if m.startswith("repeld.report") and m != "repeld.report.main"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {report!r}: importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in ('trio', 'socket', 'select', 'netaddr', 'cffi') "
        "if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(SRC)!r})\n" + code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == ""
    assert len(report) >= 4
