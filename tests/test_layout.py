"""The package layout holds: each stage imports only the stages below it, and no module imports itself
back through others (module-level and function-level imports alike)."""

import ast
from pathlib import Path

import pytest

import moequant

REPO = Path(moequant.__file__).resolve().parents[1]
# the installed package: moequant/ plus the folders installed as its subpackages (pyproject package-dir)
FOLDERS = {
    "moequant": "moequant",
    "calibration": "moequant.calibration",
    "kernels": "moequant.kernels",
    "evals": "moequant.evals",
}
# stages from the top down; a module may import its own stage and the stages after it (the benchmarks in
# evals/bench/ run the whole tool, so they sit on top)
LAYERS = [
    "bench",
    "cli",
    "api",
    "evals",
    "quantize",
    "plan",
    "calibration",
    "checkpoint",
    "modules",
    "kernels",
    "quantizers",
    "arch",
    "base",
]
BASE = {"moequant", "moequant.config", "moequant.errors", "moequant.runtime.memory"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if folder == "moequant" and parts and parts[0] in ("calibration", "kernels", "evals"):
                continue
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that `path` imports (a `from pkg import mod` counts as pkg.mod when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            subs = {f"{base}.{a.name}" for a in node.names}
            found |= subs if subs <= known else subs | {base}  # `from pkg import mod` imports the module
    # a module's own parent packages are imported with it by Python: not an edge of the graph
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def _stage(name: str) -> str:
    if name in BASE:
        return "base"
    if name.startswith("moequant.evals.bench"):
        return "bench"
    if name == "moequant.__main__":  # `python -m moequant`: the command line's entry point
        return "cli"
    part = name.split(".")[1]
    return part if part in LAYERS else "base"


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def test_every_stage_imports_only_downward(graph):
    rank = {s: i for i, s in enumerate(LAYERS)}
    assert {_stage(m) for m in graph} >= set(LAYERS) - {"base"}
    upward = [
        f"{a} -> {b}"
        for a, deps in graph.items()
        for b in deps
        if rank[_stage(b)] < rank[_stage(a)]
        and not (
            a == "moequant"
            and b in ("moequant.arch", "moequant.checkpoint.format", "moequant.checkpoint.ct_loading")
        )  # registration
    ]
    assert not upward, upward


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:3]


def test_the_checker_sees_the_imports(graph):
    """The graph is real: a few imports the code is known to make are in it."""
    assert "moequant.quantize.experts" in graph["moequant.quantize.layer_pass"]
    assert "moequant.kernels.reference" in graph["moequant.modules.qexperts"]
    assert "moequant.evals.card" in graph["moequant.api"]  # a function-level import
    assert "moequant.calibration.stream" in graph["moequant.calibration.profiler"]
