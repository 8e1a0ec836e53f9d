"""Give freed heap memory back to the operating system between layers.

glibc keeps freed blocks below its mmap threshold (up to 32 MB once raised) in the process heap, so a
layer's temporaries stay in the resident set after they are freed and the next layer's land elsewhere:
RSS creeps up layer after layer although live tensors do not (evals/results/bench_memory.md).
`malloc_trim(0)` returns those pages; elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        fn = None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> None:
    fn = _libc_trim()
    if fn is not None:
        fn(0)
