"""Where a pass computes: `--device cuda | cuda:N | cpu` (default: CUDA when available, else CPU), and how much
of that device's memory a pass may plan for."""

from __future__ import annotations

import torch

from moequant.errors import MoEQuantError


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The compute device of `spec` ("auto"/None: cuda when available, else cpu); a device that is not there
    is refused with what is."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise MoEQuantError(f"unknown device {spec!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise MoEQuantError(f"device {spec!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MoEQuantError(f"--device {spec}: no CUDA device is available here (torch {torch.__version__})")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise MoEQuantError(
            f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return device


def free_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator (None on CPU: the host's memory is planned elsewhere)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def available_bytes(device: torch.device) -> int | None:
    """Memory a pass may still take where `device` computes: an accelerator's free memory, or the host's
    (runtime/host_memory.py; None where it cannot be read)."""
    if device.type == "cuda":
        return free_bytes(device)
    from moequant.runtime.host_memory import host_available_bytes

    return host_available_bytes()


def pinned(t: torch.Tensor) -> torch.Tensor:
    """t in page-locked host memory when CUDA is there (fast, asynchronous copies to the device), else t."""
    if t.device.type == "cpu" and torch.cuda.is_available():
        return t.pin_memory()
    return t
