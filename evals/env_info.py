"""What a recorded result needs beside its numbers: machine, date, file sizes."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch


def machine() -> str:
    """One line: CPU model and cores, memory, accelerator (if any), torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores{mem}, {gpu}, torch {torch.__version__}"


def today() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (*.safetensors) of a model folder."""
    return sum(
        p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.name != "moments.safetensors"
    )


def code_version() -> str:
    """moequant's version, plus the git commit (and "dirty" when files differ from it) in a source checkout."""
    from moequant import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {commit}{', dirty' if dirty else ''})"
