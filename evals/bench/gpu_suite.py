"""Every GPU check in one script, for the day a GPU is at hand (one H100: under 8 minutes).

    python -m moequant.evals.bench.gpu_suite --out $OUT          # on the GPU machine; tables under $OUT
    python -m moequant.evals.bench.gpu_suite --dry --out DIR     # CPU, tiny sizes: the CI check that it runs

Steps, in order, each in its own child process (gpu_suite_child.py) with its own time budget, inside a total
budget (default 480 s), so a step that hangs or crashes costs only its own budget:

    gpu_tests     pytest -m gpu (the tests marked gpu)                                  gpu_suite_tests.py
    quantize      moequant quantize --device cuda on a 4-layer OLMoE-shape checkpoint    gpu_suite_quantize.py
                  written there (random weights): pass times, peak device memory
    kernels       the kernel table of evals/bench/kernels.py                             gpu_suite_kernels.py
    runtime       fused Triton path vs the torch reference, bundled model in bf16        gpu_suite_runtime.py
    kernel_cases  tests/kernels' Triton kernel cases compiled on CUDA                    gpu_suite_tests.py

Writes `<out>/<step>.md` and `.json` per step, `<out>/summary.md` and `.json`, the steps' logs in
`<out>/logs/`. Checkpoints go to a scratch folder (--workdir, default a temporary one), removed afterwards.
A step that cannot run (no CUDA device, a missing package, the total budget spent) is recorded as skipped
with its reason and the next runs. Exit status 0 when every step asked ran and passed (dry: the steps that
need CUDA by nature may skip), else 1.

`--dry` runs every step on CPU at tiny sizes (a 2-layer tiny OLMoE-shape checkpoint, the kernel table's
builders at one small shape through the reference path, the bundled model in float32 with the kernels under
the Triton interpreter) and marks every table DRY: no GPU figure comes out of a dry run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moequant.evals.bench.child import ChildRun
from moequant.evals.bench.gpu_suite_child import STEPS as CHILD_STEPS
from moequant.evals.bench.gpu_suite_record import DRY_BANNER, Status, StepResult, read_record, write_record
from moequant.evals.bench.gpu_suite_tests import DRY_SKIP_KERNEL_CASES


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # its own limit; the total budget left caps it
    cpu_skips: bool = False  # may find nothing to run on CPU: a dry run may skip it
    dry_skip: str = ""  # why a dry run skips it without starting it
    env: tuple[tuple[str, str], ...] = ()  # extra environment of its child (dry runs only)


STEPS = (
    Step("gpu_tests", 60, cpu_skips=True),
    Step("quantize", 200),
    Step("kernels", 120),
    Step("runtime", 60, env=(("TRITON_INTERPRET", "1"),)),  # dry: the kernels under the interpreter
    Step("kernel_cases", 90, cpu_skips=True, dry_skip=DRY_SKIP_KERNEL_CASES),
)
TOTAL_BUDGET_S = 480  # 8 minutes on one H100
MIN_STEP_S = 5  # less left of the total budget than this: the step is skipped, not started
SCRUB = ("TRITON_INTERPRET", "MOEQUANT_KERNEL")  # the children choose their kernel paths themselves


def run_step(step: Step, budget_s: float, out: Path, work: Path, dry: bool) -> dict:
    """Run one step's child within `budget_s`; its record, with status, reason and wall seconds."""
    log = out / "logs" / f"{step.name}.log"
    cmd = [sys.executable, "-m", "moequant.evals.bench.gpu_suite_child", step.name, "--out", str(out),
           "--work", str(work / step.name)] + (["--dry"] if dry else [])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in SCRUB} | (dict(step.env) if dry else {})
    for stale in (out / f"{step.name}.json", out / f"{step.name}.md"):  # a record of an earlier run
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group: its pytest, its workers
            rc, timed_out = proc.wait(), True
    wall = round(time.perf_counter() - t0, 1)
    record = None if timed_out else read_record(out, step.name)
    if record is None:  # killed, or died before writing: the driver writes the step's record
        if timed_out:
            result = StepResult(
                Status.TIMEOUT, f"killed at its budget of {budget_s:.0f} s (log: logs/{log.name})"
            )
        else:
            reason = ChildRun(rc, None, wall, log).error_line()
            result = StepResult(Status.FAILED, f"exit status {rc}, no record: {reason}")
        device = "cpu" if dry else "cuda"
        record = write_record(out, step.name, CHILD_STEPS[step.name][0], dry, device, result)
    return {"step": step.name, "title": record["title"], "status": record["status"], "reason": record["reason"],
            "device": record["device"], "rc": rc, "wall_s": wall, "budget_s": round(budget_s),
            "table": f"{step.name}.md"}  # fmt: skip


def skip(step: Step, reason: str, out: Path, dry: bool) -> dict:
    """Record a step that is not started: skipped, with its reason."""
    title = CHILD_STEPS[step.name][0]
    write_record(out, step.name, title, dry, "cpu" if dry else "cuda", StepResult(Status.SKIPPED, reason))
    return {"step": step.name, "title": title, "status": Status.SKIPPED.value, "reason": reason,
            "device": None, "rc": None, "wall_s": 0.0, "budget_s": 0, "table": f"{step.name}.md"}  # fmt: skip


def passed(step: Step, status: str, dry: bool) -> bool:
    return status == Status.OK.value or (dry and step.cpu_skips and status == Status.SKIPPED.value)


def summary_markdown(summary: dict) -> str:
    dry = summary["dry"]
    lines = [f"# GPU suite{' (DRY)' if dry else ''}: {'all asked ran and passed' if summary['ok'] else 'NOT all passed'}",
             ""] + ([f"**{DRY_BANNER}**", ""] if dry else []) + [
        f"{summary['date']}; `{summary['command']}`; device: {', '.join(summary['devices']) or 'none'}; "
        f"{summary['wall_s']} s of a {summary['total_budget_s']} s budget",
        "", "| step | status | wall (s) | budget (s) | result | table |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for s in summary["steps"]:
        table = f"[{s['table']}]({s['table']})" if s["table"] else ""
        reason = str(s["reason"]).replace("|", "\\|")
        lines.append(
            f"| {s['step']} | {s['status']} | {s['wall_s']} | {s['budget_s']} | {reason} | {table} |"
        )
    return "\n".join(lines) + "\n"


def parse_budgets(items: list[str]) -> dict[str, int]:
    budgets = {}
    for item in items:
        name, _, secs = item.partition("=")
        if name not in {s.name for s in STEPS} or not secs.isdigit():
            raise SystemExit(f"--budget {item!r}: STEP=SECONDS with STEP one of {[s.name for s in STEPS]}")
        budgets[name] = int(secs)
    return budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, tables marked dry (the CI check)")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated, in this order")
    p.add_argument("--total-budget", type=int, default=TOTAL_BUDGET_S, help="seconds for the whole run")
    p.add_argument("--budget", action="append", default=[], help="STEP=SECONDS: one step's own budget")
    p.add_argument("--workdir", default=None, help="scratch for checkpoints (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    if not args.out:
        p.error("no output folder: pass --out DIR or set OUT")
    wanted = [w for w in args.steps.split(",") if w]
    unknown = set(wanted) - {s.name for s in STEPS}
    if unknown:
        p.error(f"unknown --steps {sorted(unknown)}; steps: {[s.name for s in STEPS]}")
    budgets = parse_budgets(args.budget)
    out = Path(args.out).resolve()  # the children run pytest from the repository root
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moequant-gpu-suite-")).resolve()
    t0 = time.perf_counter()
    rows = []
    try:
        for step in (s for s in STEPS if s.name in wanted):
            left = args.total_budget - (time.perf_counter() - t0)
            budget = min(budgets.get(step.name, step.budget_s), left)
            if left < MIN_STEP_S:
                row = skip(step, f"the total budget of {args.total_budget} s is spent", out, args.dry)
            elif args.dry and step.dry_skip:
                row = skip(step, step.dry_skip, out, args.dry)
            else:
                row = run_step(step, budget, out, work, args.dry)
            row["passed"] = passed(step, row["status"], args.dry)
            rows.append(row)
            print(f"{step.name}: {row['status']} in {row['wall_s']} s ({row['reason']})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "dry": args.dry,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m moequant.evals.bench.gpu_suite "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_budget_s": args.total_budget,
        "wall_s": round(time.perf_counter() - t0, 1),
        "devices": sorted({r["device"] for r in rows if r["device"]}),
        "ok": all(r["passed"] for r in rows) and len(rows) == len(wanted),
        "steps": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
