"""The GPU suite's test steps: pytest in a child, one row per test from its JUnit XML.

gpu_tests     the tests marked `gpu` (pytest -m gpu), in the test files that mark them
kernel_cases  the Triton kernel cases (tests/kernels: sort, gemm, moe, tiles) compiled on CUDA; on CPU CI
              they run in the interpreter (test_moe.test_kernel_cases_under_interpreter), so a dry run
              skips this step
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from moequant.evals.bench.gpu_suite_record import Status, StepContext, StepResult

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
KERNEL_CASE_MODULES = ("sort", "gemm", "moe", "tiles")  # tests/kernels/test_moe.py KERNEL_CASE_MODULES
DRY_SKIP_KERNEL_CASES = (
    "the kernel cases compile on CUDA only; CPU CI runs them under the Triton interpreter "
    "(tests/kernels/test_moe.py::test_kernel_cases_under_interpreter)"
)
NO_TESTS = 5  # pytest's exit status when nothing was collected or everything was deselected


def marked_files(tests: Path = TESTS, marker: str = "gpu") -> list[Path]:
    """Test files that mark tests with `marker` (a decorator or a module-level pytestmark)."""
    return sorted(p for p in tests.rglob("test_*.py") if f"mark.{marker}" in p.read_text(errors="replace"))


def junit_rows(xml_path: Path) -> list[tuple[str, str, float, str]]:
    """(test id, outcome, seconds, message) per test case of a pytest JUnit XML file."""
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        rows.append((name, outcome, round(float(case.get("time") or 0.0), 2), message))
    return rows


def run_pytest(ctx: StepContext, name: str, args: list[str]) -> StepResult:
    if not TESTS.is_dir():
        return StepResult(Status.SKIPPED, f"no tests/ folder at {TESTS.name}: run from a source checkout")
    try:
        import pytest  # noqa: F401
    except ImportError:
        return StepResult(Status.SKIPPED, "pytest is not installed (pip install -e '.[dev]')")
    xml = ctx.out / "logs" / f"{name}.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-20_000:], proc.stderr[-5_000:], sep="\n")  # the step's log
    rows = junit_rows(xml) if xml.is_file() else []
    summary = next((s for s in reversed(proc.stdout.strip().splitlines()) if s.strip()), "")
    notes = (f"command: `pytest {' '.join(str(a) for a in args)}`", f"pytest: {summary}")
    columns = ("test", "outcome", "seconds", "message")
    if proc.returncode == NO_TESTS:
        return StepResult(Status.SKIPPED, f"no test ran here ({summary})", columns, tuple(rows), notes)
    status = Status.OK if proc.returncode == 0 else Status.FAILED
    return StepResult(status, summary, columns, tuple(rows), notes)


def run_gpu_marked(ctx: StepContext) -> StepResult:
    files = marked_files()
    if not files:
        return StepResult(Status.SKIPPED, "no test file marks a test `gpu`")
    return run_pytest(ctx, "gpu_tests", ["-m", "gpu", *(str(f.relative_to(REPO)) for f in files)])


def run_kernel_cases(ctx: StepContext) -> StepResult:
    if ctx.dry:
        return StepResult(Status.SKIPPED, DRY_SKIP_KERNEL_CASES)
    files = [f"tests/kernels/test_{m}.py" for m in KERNEL_CASE_MODULES]
    return run_pytest(ctx, "kernel_cases", ["-k", "not under_interpreter", *files])
