"""The layout rules of the package: imports run one way (no cycle), no module imports another's private names,
no module grows past what a newcomer can hold, pipeline modules are imported at the top of files (only the command
line defers them, to answer fast), and the tree passes the linter configured in pyproject.toml."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"
MAX_LINES = 450
LAZY_ALLOWED = {"pipeline.cli"}  # the command line imports a command's modules when that command runs


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(target: str, names: list[str]) -> list[str]:
    """The pipeline modules an ``import``/``from … import`` of ``target`` brings in (a submodule when a name is one)."""
    out = []
    for name in names or [""]:
        sub = f"{target}.{name}" if name else target
        if sub in MODULES:
            out.append(sub)
        elif target in MODULES:
            out.append(target)
    return out


def imports(name: str) -> list[tuple[str, list[str], bool, int]]:
    """``(module, imported names, at top level, line)`` for every import of a pipeline module in ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(n) for n in tree.body}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pipeline":
                    found.append((alias.name, [], id(node) in top, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "pipeline":
                found.append((target, [a.name for a in node.names], id(node) in top, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for target, names, _, _ in imports(name) for m in resolve(target, names) if m != name}
            for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    edges = graph()
    assert "pipeline.training" in MODULES and "pipeline.evaluation.evaluate" in edges["pipeline.training"] or \
        "pipeline.evaluation" in edges["pipeline.training"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    bad = [f"{MODULES[n].relative_to(ROOT)}:{line} imports {target}.{x}"
           for n in MODULES for target, names, _, line in imports(n) for x in names
           if x.startswith("_") and not x.startswith("__")]
    assert not bad, "\n".join(bad)


def test_pipeline_modules_are_imported_at_the_top():
    bad = [f"{MODULES[n].relative_to(ROOT)}:{line} imports {target} inside a function"
           for n in MODULES if n not in LAZY_ALLOWED for target, _, at_top, line in imports(n) if not at_top]
    assert not bad, "\n".join(bad)


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_tree_passes_the_linter():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed (it is a dev dependency in pyproject.toml: `make install`)")
    out = subprocess.run([ruff, "check", "--no-cache", "pipeline", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
