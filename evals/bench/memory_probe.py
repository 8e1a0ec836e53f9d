"""Resident-memory probes of the memory benchmark: the parent-side sampler of a child's process tree (RSS,
file-backed share, VmHWM, ru_maxrss) and, inside the instrumented child, the phase tracker (RSS at each phase
boundary, peak inside each phase, live CPU tensor bytes). See evals/bench/memory.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

MB = 1e6
SAMPLE_S = 0.05  # RSS sampling period of the parent-side sampler


def _tree_rss(proc) -> tuple[int, int]:
    """(rss, file-backed+shmem rss) of proc and its children, bytes."""
    import psutil

    rss = shared = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            m = p.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += m.rss
        shared += m.shared
    return rss, shared


def _vm_hwm(pid: int) -> int:
    """VmHWM (peak resident set, kept by the kernel) of a live process in bytes; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(cmd: list[str], env: dict | None = None, log_path: Path | None = None) -> dict:
    """Run cmd, sampling the RSS of its process tree every SAMPLE_S; peak, timeline and ru_maxrss."""
    import psutil

    t0 = time.perf_counter()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    proc = psutil.Process(child.pid)
    timeline = []  # (s, rss MB, anon MB)
    peak = {"rss": 0, "anon": 0, "file": 0, "t": 0.0, "hwm": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss, shared = _tree_rss(proc)
            except psutil.NoSuchProcess:
                break
            t = time.perf_counter() - t0
            timeline.append((round(t, 2), round(rss / MB, 1), round((rss - shared) / MB, 1)))
            if rss > peak["rss"]:
                peak.update(rss=rss, file=shared, t=round(t, 2))
            peak["anon"] = max(peak["anon"], rss - shared)
            peak["hwm"] = max(peak["hwm"], _vm_hwm(child.pid))
            done.wait(SAMPLE_S)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    if log_path:
        out.close()
    wall = time.perf_counter() - t0
    return {
        "cmd": cmd,
        "returncode": child.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_MB": round(peak["rss"] / MB, 1),
        "peak_rss_file_MB_at_peak": round(peak["file"] / MB, 1),
        "peak_anon_MB": round(peak["anon"] / MB, 1),
        "peak_at_s": peak["t"],
        "vm_hwm_MB": round(peak["hwm"] / MB, 1),
        "ru_maxrss_MB": round(ru.ru_maxrss * 1024 / MB, 1),  # Linux: kilobytes
        "samples": len(timeline),
        "timeline": timeline[:: max(1, len(timeline) // 400)],
    }


# ---- inside the instrumented child ------------------------------------------------------------------


def _proc_status() -> tuple[int, int]:
    """(rss, anon rss) of this process from /proc/self/status, bytes."""
    vals = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:")):
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("RssAnon", 0)


def _live_tensor_bytes() -> int:
    """Bytes of distinct CPU tensor storages reachable from Python objects (meta tensors excluded)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
            key = st.data_ptr()
            if key in seen or key == 0:
                continue
            seen.add(key)
            total += st.nbytes()
        except Exception:  # noqa: BLE001 (odd tensor subclasses)
            continue
    return total


class PhaseTracker:
    """Current phase label + a 10 ms sampler thread recording the peak RSS inside each phase."""

    def __init__(self):
        self.phase = "startup"
        self.events: list[dict] = []
        self.peaks: dict[str, list[int]] = {}  # phase -> [peak rss, peak anon]
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.01)

    def _sample(self):
        rss, anon = _proc_status()
        p = self.peaks.setdefault(self.phase, [0, 0])
        p[0], p[1] = max(p[0], rss), max(p[1], anon)

    def mark(self, label: str, tensors: bool = False):
        self._sample()
        rss, anon = _proc_status()
        ev = {"t": round(time.perf_counter() - self.t0, 2), "at": label, "rss_MB": round(rss / MB, 1)}
        ev["anon_MB"] = round(anon / MB, 1)
        if tensors:
            ev["live_tensors_MB"] = round(_live_tensor_bytes() / MB, 1)
        self.events.append(ev)
        self.phase = label

    def stop(self):
        self._sample()
        self._stop.set()
