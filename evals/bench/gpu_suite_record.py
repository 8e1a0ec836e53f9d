"""What one step of the GPU suite (gpu_suite.py) hands back: its status, its reason, its table; and how a step's
record and table are written (`<out>/<step>.json`, `<out>/<step>.md`).

A dry run (CPU, tiny sizes: the suite's CI check) writes the same tables, each titled and flagged as dry: its
numbers are CPU figures of a smoke run, never GPU figures.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

DRY_BANNER = "DRY RUN: CPU, tiny sizes, to check the script runs; these are not GPU figures."


class Status(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    # could not run here (no CUDA device, a missing package, the budget spent): its reason says why
    SKIPPED = "skipped"
    TIMEOUT = "timeout"  # killed at its time budget


@dataclass(frozen=True)
class StepContext:
    """Where and how a step runs."""

    out: Path  # the suite's output folder: tables go here
    work: Path  # scratch (checkpoints): not under `out`, removed after the run
    dry: bool
    device: str  # "cuda" or, dry, "cpu"


@dataclass(frozen=True)
class StepResult:
    status: Status
    reason: str = ""  # one line: why it failed or skipped, or what it found
    columns: tuple[str, ...] = ()
    rows: tuple[tuple, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)  # lines printed above the table


def markdown(title: str, dry: bool, result: StepResult) -> str:
    lines = [f"# {title}{' (DRY)' if dry else ''}", ""]
    if dry:
        lines += [f"**{DRY_BANNER}**", ""]
    lines += [f"status: **{result.status.value}**" + (f": {result.reason}" if result.reason else ""), ""]
    lines += [f"- {n}" for n in result.notes] + ([""] if result.notes else [])
    if result.columns:
        lines += ["| " + " | ".join(result.columns) + " |", "|" + "---|" * len(result.columns)]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in result.rows]
    return "\n".join(lines).rstrip() + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_record(out: Path, step: str, title: str, dry: bool, device: str, result: StepResult) -> dict:
    """`<out>/<step>.json` and `<out>/<step>.md`; returns the JSON record."""
    record = {
        "step": step,
        "title": title,
        "dry": dry,
        "device": device,
        "status": result.status.value,
        "reason": result.reason,
        "notes": list(result.notes),
        "columns": list(result.columns),
        "rows": [list(r) for r in result.rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{step}.json").write_text(json.dumps(record, indent=1, default=str))
    (out / f"{step}.md").write_text(markdown(title, dry, result))
    return record


def read_record(out: Path, step: str) -> dict | None:
    path = out / f"{step}.json"
    return json.loads(path.read_text()) if path.is_file() else None
