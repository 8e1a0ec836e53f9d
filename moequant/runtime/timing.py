"""Wall-clock seconds of one command: since the process started, and per pass (profile, damage, probe,
quantize, write), for the quantize command's closing table.

    with timing.timed("profile"):
        prof = profile_pass(...)
    timing.passes()            # {"profile": 3.1, ...} in the order the passes first ran
    timing.elapsed()           # since the command started: the process's start for `moequant ...` (imports
                               # included, as /usr/bin/time sees it), else since reset()
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

_seconds: dict[str, float] = {}
_start = {"at": time.time()}  # wall-clock time (time.time()) the command started


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Add the wall-clock time of the block to pass `name` (a pass run twice counts both runs)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _seconds[name] = _seconds.get(name, 0.0) + time.perf_counter() - t0


def passes() -> dict[str, float]:
    """Seconds per pass recorded since the last reset()."""
    return dict(_seconds)


def reset(from_process_start: bool = False) -> None:
    """A command starts: forget the recorded passes; its time counts from the process's start (the command
    line run as `moequant ...`) or from now (main() called from Python)."""
    _seconds.clear()
    _start["at"] = _process_start() if from_process_start else time.time()


def elapsed() -> float:
    """Seconds since the command started (see reset)."""
    return max(0.0, time.time() - _start["at"])


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()
