"""Helpers several test files share (put on sys.path by pytest with tests/conftest.py; a child process
started by a test adds this folder itself)."""

from moequant.modules.qexperts import QuantizedExperts


def set_kernel(model, kernel: str | None) -> int:
    """Force every QuantizedExperts of `model` onto "triton" or "reference" (None: automatic). Returns the count."""
    if kernel not in (None, "triton", "reference"):
        raise ValueError(f"kernel must be 'triton', 'reference' or None, got {kernel!r}")
    mods = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for m in mods:
        m.kernel = kernel
    return len(mods)
