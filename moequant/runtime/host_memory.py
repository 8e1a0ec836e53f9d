"""How much host memory a pass may still take: the kernel's MemAvailable, and the room left under this
process's memory cgroup limit when it has one (v1 or v2; page cache charged to the cgroup counts as used, so
the figure errs low)."""

from __future__ import annotations

from pathlib import Path

_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 reports "no limit" as a huge page-rounded number


def host_available_bytes() -> int | None:
    """The smaller of MemAvailable and the cgroup's limit minus its usage; None where neither can be read."""
    figures = [f for f in (_mem_available(), _cgroup_room()) if f is not None]
    return min(figures) if figures else None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """limit - usage of this process's memory cgroup (v2: memory.max / memory.current, v1: memory.limit_in_bytes
    / memory.usage_in_bytes); None without a limit or where the files cannot be read."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            files = (_CGROUP_ROOT / path.lstrip("/"), "memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            files = (
                _CGROUP_ROOT / "memory" / path.lstrip("/"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        else:
            continue
        room = _room(*files)
        if room is not None:
            return room
    return None


def _room(folder: Path, limit_file: str, usage_file: str) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= _NO_LIMIT:
        return None
    return max(0, int(limit) - usage)
