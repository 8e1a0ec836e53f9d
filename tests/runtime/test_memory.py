"""Giving freed heap memory back to the system: what is asked of glibc, and nothing without it."""

import moequant.runtime.memory as memory


class _Libc:
    def __init__(self):
        self.calls = []

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1


def test_calls_into_glibc(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    memory.release_free_memory()
    memory.return_large_frees_at_once()
    assert libc.calls == [("malloc_trim", 0), ("mallopt", -3, 4 * 2**20)]  # M_MMAP_THRESHOLD, 4 MiB
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    memory.return_large_frees_at_once()
    assert len(libc.calls) == 2


def test_without_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    memory.release_free_memory()
    memory.return_large_frees_at_once()
