"""evals/bench/gpu_suite.py: its dry mode (CPU, tiny sizes) runs every step end to end and writes every table,
marked dry, with the expected rows; a step past its budget is killed and recorded, a spent total budget skips
the rest, and outside a dry run a machine without CUDA records each step as skipped and exits 1."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moequant.evals.bench import gpu_suite
from moequant.evals.bench.gpu_suite_record import DRY_BANNER
from moequant.evals.bench.gpu_suite_tests import junit_rows, marked_files

STEP_NAMES = [s.name for s in gpu_suite.STEPS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    cmd = [sys.executable, "-m", "moequant.evals.bench.gpu_suite", "--dry", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc, out


def _record(out: Path, step: str) -> dict:
    return json.loads((out / f"{step}.json").read_text())


def test_dry_run_passes_and_writes_the_summary(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == STEP_NAMES
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["quantize"] == status["kernels"] == status["runtime"] == "ok", summary
    assert status["gpu_tests"] in ("ok", "skipped") and status["kernel_cases"] == "skipped"
    assert all(s["wall_s"] <= s["budget_s"] for s in summary["steps"])
    assert DRY_BANNER in (out / "summary.md").read_text()
    for step in STEP_NAMES:
        started = step != "kernel_cases"  # a dry run records it skipped without starting it
        assert (out / "logs" / f"{step}.log").is_file() == started, step
        md = (out / f"{step}.md").read_text()
        assert "(DRY)" in md and DRY_BANNER in md, step
        assert _record(out, step)["dry"] is True


def test_dry_tables_hold_the_expected_rows(dry_run):
    _, out = dry_run
    quantize = _record(out, "quantize")
    passes = [r[0] for r in quantize["rows"]]
    assert {"profile pass", "damage table", "quantize pass", "whole command"} <= set(passes), passes
    assert all(r[2] is not None and r[2] >= 0 for r in quantize["rows"])
    assert any("peak device memory" in n for n in quantize["notes"])
    command = next(n for n in quantize["notes"] if n.startswith("command:"))
    assert (
        "CKPT --bits 3 --calib CALIB.txt" in command and "moequant-gpu-suite" not in command
    )  # no scratch paths

    kernels = _record(out, "kernels")
    assert kernels["columns"][:3] == ["shape", "batch", "format"]
    assert sorted((r[1], r[2]) for r in kernels["rows"]) == [
        (1, "int4"),
        (1, "mixed"),
        (16, "int4"),
        (16, "mixed"),
    ]
    assert (out / "kernels" / "bench_kernels_dry.md").is_file()

    runtime = _record(out, "runtime")
    assert len(runtime["rows"]) == 1
    _, dtype, err, agree, *_ = runtime["rows"][0]
    assert dtype == "float32" and err < 1e-3 and agree >= 0.99

    tests = _record(out, "gpu_tests")
    assert any("pytest -m gpu" in n for n in tests["notes"])


def test_a_step_past_its_budget_is_killed(tmp_path):
    cmd = [sys.executable, "-m", "moequant.evals.bench.gpu_suite", "--dry", "--out", str(tmp_path),
           "--steps", "kernels", "--budget", "kernels=1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    (step,) = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert step["status"] == "timeout" and step["wall_s"] < 10, step
    assert "status: **timeout**" in (tmp_path / "kernels.md").read_text()  # the driver wrote its record


def test_a_spent_total_budget_skips_the_rest(tmp_path):
    assert (
        gpu_suite.main(["--dry", "--out", str(tmp_path), "--steps", "quantize", "--total-budget", "1"]) == 1
    )
    (step,) = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert step["status"] == "skipped" and "budget" in step["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_each_step_is_skipped_and_the_run_fails(tmp_path):
    assert gpu_suite.main(["--out", str(tmp_path), "--steps", "kernels"]) == 1
    (step,) = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert step["status"] == "skipped" and "no CUDA device" in step["reason"]


def test_junit_rows_and_marked_files(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="a" name="t1" time="0.5"/>'
        '<testcase classname="a" name="t2" time="1"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="b" name="t3" time="2"><failure message="boom&#10;more"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert junit_rows(xml) == [
        ("a::t1", "passed", 0.5, ""),
        ("a::t2", "skipped", 1.0, "needs CUDA"),
        ("b::t3", "failed", 2.0, "boom"),
    ]
    assert "test_moe.py" in {p.name for p in marked_files()}


def test_unknown_steps_and_budgets_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry", "--out", str(tmp_path), "--steps", "nope"])
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry", "--out", str(tmp_path), "--budget", "kernels=x"])
