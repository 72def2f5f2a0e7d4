"""Every stage's DVC ``deps`` cover all the code it runs, so an edit that changes a stage's behaviour
always invalidates that stage.

The imports are read statically from the source (``ast``), transitively from each stage script,
function-level imports and package ``__init__`` files included; ms-swift plugin files that the train
stage hands to ``swift sft`` count as the train stage's code too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Dotted ``coordexp`` modules that ``path`` imports (the module itself, or a submodule a from-import names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "coordexp"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "coordexp":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def code_files(script: Path) -> set[Path]:
    """``script`` and every project file it runs through imports, transitively."""
    seen: set[Path] = {script}
    todo = [script]
    while todo:
        for name in _imports(todo.pop()):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
                f = _module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> Path:
    words = stage["cmd"].split()
    return ROOT / next(w for w in words if w.endswith(".py"))


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_every_imported_module(name):
    stage = _stages()[name]
    deps = [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in stage["deps"]]
    files = code_files(_script(stage))
    if name == "train":  # swift sft imports the plugin files in its own processes
        files |= code_files(SRC / "coordexp" / "train" / "swift_external" / "plugin.py")
    uncovered = sorted(str(f.relative_to(ROOT)) for f in files if not any(f == d or d in f.parents for d in deps))
    assert not uncovered, f"dvc.yaml stage {name!r} runs code outside its deps: {uncovered}"


def test_the_import_walk_sees_through_packages_and_function_imports(tmp_path):
    """The walk itself: a from-import of a submodule, a function-level import and an __init__ all count."""
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from coordexp.train import stage\n")
    files = {str(f.relative_to(ROOT)) for f in code_files(script) if f != script}
    assert {
        "src/coordexp/__init__.py",
        "src/coordexp/train/__init__.py",
        "src/coordexp/train/stage.py",
        "src/coordexp/core/config.py",
    } <= files


def test_no_import_cycles():
    """No module imports (directly or through others) a module that imports it back."""
    modules = {
        ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (SRC / "coordexp").rglob("*.py")
    }
    graph = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ is not an edge back: importing a.b runs a/__init__ first, by design
        graph[m] = {n for n in graph[m] if not m.startswith(n + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:5]}"
