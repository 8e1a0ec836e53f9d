"""The host memory a pass may still take (moequant/runtime/host_memory.py), on fake /proc and cgroup trees."""

from __future__ import annotations

import pytest

from moequant.runtime import host_memory


def _tree(tmp_path, cgroup_line: str, files: dict[str, str]):
    proc = tmp_path / "cgroup"
    proc.write_text(cgroup_line + "\n")
    root = tmp_path / "fs"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


@pytest.mark.parametrize(
    ("line", "files", "room"),
    [
        ("0::/job", {"job/memory.max": "3000\n", "job/memory.current": "1000\n"}, 2000),  # v2
        ("0::/job", {"job/memory.max": "max\n", "job/memory.current": "1000\n"}, None),  # v2, no limit
        (
            "4:memory:/job",
            {"memory/job/memory.limit_in_bytes": "5000\n", "memory/job/memory.usage_in_bytes": "4500\n"},
            500,
        ),  # v1
        (
            "4:memory:/job",
            {
                "memory/job/memory.limit_in_bytes": "9223372036854771712\n",
                "memory/job/memory.usage_in_bytes": "1\n",
            },
            None,
        ),  # v1, no limit
        (
            "4:memory:/job",
            {"memory/job/memory.limit_in_bytes": "100\n", "memory/job/memory.usage_in_bytes": "900\n"},
            0,
        ),
        ("4:pids:/job", {}, None),  # no memory controller
    ],
)
def test_cgroup_room(tmp_path, monkeypatch, line, files, room):
    proc, root = _tree(tmp_path, line, files)
    monkeypatch.setattr(host_memory, "_PROC_CGROUP", proc)
    monkeypatch.setattr(host_memory, "_CGROUP_ROOT", root)
    assert host_memory._cgroup_room() == room


def test_available_is_the_smaller_figure(tmp_path, monkeypatch):
    proc, root = _tree(tmp_path, "0::/job", {"job/memory.max": "3000\n", "job/memory.current": "1000\n"})
    monkeypatch.setattr(host_memory, "_PROC_CGROUP", proc)
    monkeypatch.setattr(host_memory, "_CGROUP_ROOT", root)
    assert host_memory.host_available_bytes() == 2000  # far below this machine's MemAvailable
    monkeypatch.setattr(host_memory, "_PROC_CGROUP", tmp_path / "missing")
    mem = host_memory._mem_available()
    assert mem is not None and mem > 0 and host_memory.host_available_bytes() == mem
