"""What a recorded result needs beside its numbers: machine, date, file sizes."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def source_fingerprint() -> dict:
    """git HEAD, how many library files differ from it, and a hash of the library sources (moequant/,
    calibration/, kernels/) a benchmark runs: the figure's code version even when the tree is dirty."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("moequant", "calibration", "kernels"):
        for f in sorted((root / folder).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--", "moequant", "calibration", "kernels").splitlines()
        dirty = [line for line in status if line.strip() and not line.startswith("??")]
    except (OSError, subprocess.SubprocessError):
        head, dirty = "unknown", []
    return {"git_head": head, "uncommitted_library_files": len(dirty), "source_sha256": h.hexdigest()[:12]}


def machine() -> str:
    """One line: CPU model and cores, memory, accelerator (if any), torch version."""
    cpu = cpu_model()
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores{mem}, {gpu}, torch {torch.__version__}"


def run_meta(module: str, args) -> dict:
    """The header every recorded result starts with: UTC date, the command (module + parsed args), machine,
    load average, library code version."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m {module} " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": machine(),
        "load_average": os.getloadavg(),
        "code": source_fingerprint(),
    }


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
