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
def _glibc():
    """The C library when it is glibc (it has malloc_trim and the mallopt parameters used here), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim"):  # musl, macOS
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def release_free_memory() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20


def return_large_frees_at_once() -> None:
    """Serve every allocation of 4 MiB or more with its own mmap, unmapped when freed.

    By default glibc raises its mmap threshold up to 32 MB as large blocks are freed, after which freed
    tensors of up to 32 MB stay in the heap; a layer's many temporaries (token slices, Hessian chunks,
    unpacked codes) then leave the resident set far above the live tensors (peak with and without this:
    evals/results/figures_from_code_comments.md). Process-wide, set once by `moequant quantize`; skipped
    when the user set MALLOC_MMAP_THRESHOLD_ themselves, and a no-op without glibc."""
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    libc = _glibc()
    if libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        logger.debug("mallopt(M_MMAP_THRESHOLD) refused")
