"""Which path runs the quantized experts (Triton kernels or the torch reference).

Selection: an explicit `backend` argument wins, else the environment variable MOEQUANT_KERNEL
(`triton` | `reference`), else Triton on CUDA tensors and the reference elsewhere.

Triton on CPU runs only in its interpreter, and Triton fixes compiled-vs-interpreted for the whole
process when it is first imported (its own `tl.zeros`, `tl.sum`, ... are built one way or the other
then). TRITON_INTERPRET=1 must therefore be in the environment before anything imports triton
(bitsandbytes does, at import); `triton_interpreted` reports the mode actually in force.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

ENV_VAR = "MOEQUANT_KERNEL"


class Backend(enum.Enum):
    TRITON = "triton"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value: str | Backend) -> Backend:
        if isinstance(value, Backend):
            return value
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown kernel backend {value!r}; choose 'triton' or 'reference'") from None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_interpreted() -> bool:
    """Whether Triton kernels launched from this process run in the CPU interpreter."""
    if "triton" not in sys.modules:
        return _env_interpret()  # the first import will follow the variable
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def resolve_backend(backend: str | Backend | None, device: torch.device) -> Backend:
    """The backend to run on tensors on `device` (see module docstring); raises when Triton cannot run."""
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            backend = env
    if backend is None:
        return Backend.TRITON if device.type == "cuda" else Backend.REFERENCE
    chosen = Backend.parse(backend)
    if chosen is Backend.TRITON:
        if device.type == "cpu" and not triton_interpreted():
            if _env_interpret():
                raise RuntimeError(
                    "the Triton kernels were requested on CPU tensors, but triton was imported in compiled mode "
                    "before TRITON_INTERPRET=1 was set (bitsandbytes, for one, imports triton): set "
                    "TRITON_INTERPRET=1 in the environment before the process starts"
                )
            raise RuntimeError(
                "the Triton kernels were requested on CPU tensors; Triton runs on CPU only in its interpreter: "
                "set TRITON_INTERPRET=1 before the process starts (tests), or use backend='reference' / "
                "MOEQUANT_KERNEL=reference"
            )
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"the Triton kernels need CUDA tensors, got device {device}")
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("the Triton kernels were requested but triton is not installed")
    return chosen


_launch_hook: Callable | None = None


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch a Triton kernel (or hand the launch to the hook installed by `record_launches`)."""
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextmanager
def record_launches() -> Iterator[list[tuple]]:
    """Collect (kernel, grid, args, kwargs) of every launch instead of running it (ahead-of-time checks)."""
    global _launch_hook
    records: list[tuple] = []
    previous, _launch_hook = _launch_hook, lambda *launch_args: records.append(launch_args)
    try:
        yield records
    finally:
        _launch_hook = previous
