"""What the benchmarks that run each tool in its own process share: the calibration file every child reads
(the same input_ids for every tool) and one child run, with its log and its JSON result.

Used by evals/bench/vs_gptqmodel.py and evals/bench/peers.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def save_calibration(data, path: str | Path) -> Path:
    """Write a CalibData's input_ids [N, L] to `path` (safetensors) and its labels beside it (`path`.json)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({"input_ids": data.input_ids.contiguous()}, str(path))
    Path(f"{path}.json").write_text(json.dumps({"labels": data.labels, "description": data.description}))
    return path


def load_calibration(path: str | Path):
    """The CalibData `save_calibration` wrote."""
    from safetensors.torch import load_file

    from moequant.calibration.data import CalibData

    meta = json.loads(Path(f"{path}.json").read_text())
    return CalibData(load_file(str(path))["input_ids"], meta["labels"], meta["description"])


@dataclass
class ChildRun:
    """One finished child process: its exit status, the JSON it wrote (None if none), wall seconds from start
    to exit as the parent saw them (interpreter start and imports included), and its log file."""

    returncode: int
    result: dict | None
    process_s: float
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def error_line(self) -> str:
        """The last line of the log that names an error (else its last non-empty line): a failure's reason."""
        lines = [line.strip() for line in self.tail(20_000).splitlines() if line.strip()]
        named = [line for line in lines if "error" in line.lower() or "Exception" in line]
        return (named or lines or [f"exit status {self.returncode}, empty log"])[-1][:300]


def run_child(cmd: list[str], json_path: Path, log: Path, env: dict | None = None) -> ChildRun:
    """Run `cmd` (which writes its result to `json_path`) with stdout and stderr to `log`; never raises on a
    failed child: the caller decides (the result is None when the child wrote no JSON)."""
    full_env = dict(os.environ) | (env or {})
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env).returncode
    process_s = time.perf_counter() - t0
    result = json.loads(json_path.read_text()) if rc == 0 and json_path.is_file() else None
    return ChildRun(rc, result, process_s, log)
