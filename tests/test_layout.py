"""The package layout holds: each stage imports only the stages below it, no module imports itself back through
others (module-level and function-level imports alike), and the tests mirror the modules."""

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
    "vllm",  # the vLLM plugin: imported by vLLM through its entry point, by nothing of moequant's
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


# Library modules without a mirror test module, and why. A module listed here that gets one (or goes) fails the
# test below: the list holds only what is true.
EXEMPT = {
    "moequant/__main__.py": "`python -m moequant`: calls the command line's main, no logic of its own",
    "moequant/cli/__main__.py": "`python -m moequant.cli`: calls main, no logic of its own",
    "moequant/errors.py": "the exception classes, no logic of their own",
    "kernels/layout.py": "tests/kernels/test_layout.py would import as `test_layout`, as tests/test_layout.py does "
    "(tests/kernels/ cannot be a package: `kernels` is the Hugging Face package transformers imports); "
    "PackedMoE is built and run by every case of tests/kernels/test_moe.py",
}


def _mirror(module: str) -> str:
    """tests/<folder>/test_<module>.py: moequant/<folder>/x.py, moequant/x.py and <folder>/x.py (kernels/,
    calibration/, evals/, installed as moequant.<folder>) alike."""
    parts = module.split("/")
    folders = parts[1:-1] if parts[0] == "moequant" else parts[:-1]
    return "/".join(["tests", *folders, "test_" + parts[-1]])


def test_every_module_has_its_mirror_test_module():
    """Tests mirror the layout (ARCHITECTURE.md): every library module but a package's __init__.py and the
    benchmark scripts of evals/bench/ has tests/<folder>/test_<module>.py, unless EXEMPT says why not."""
    modules = sorted(
        path.relative_to(REPO).as_posix()
        for folder in FOLDERS
        for path in (REPO / folder).rglob("*.py")
        if path.name != "__init__.py" and "bench" not in path.relative_to(REPO / folder).parts
        and not (folder == "moequant" and path.relative_to(REPO / folder).parts[0] in FOLDERS)
    )  # fmt: skip
    seen = {"moequant/quantize/run.py", "kernels/moe.py", "calibration/stream.py", "evals/drift.py"}
    assert seen <= set(modules)  # the checker sees every folder
    assert _mirror("moequant/cli/plan.py") == "tests/cli/test_plan.py"
    assert (
        _mirror("moequant/api.py") == "tests/test_api.py"
        and _mirror("kernels/moe.py") == "tests/kernels/test_moe.py"
    )
    missing = [
        f"{m} -> {_mirror(m)}" for m in modules if m not in EXEMPT and not (REPO / _mirror(m)).is_file()
    ]
    assert not missing, f"modules without their mirror test module: {missing}"
    stale = [m for m in EXEMPT if m not in modules or (REPO / _mirror(m)).is_file()]
    assert not stale, f"EXEMPT lists modules that are gone or have a mirror test module now: {stale}"
