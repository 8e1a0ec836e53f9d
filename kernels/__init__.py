"""Runtime of quantized MoE experts: fused dequant-GEMM Triton kernels and their torch reference.

    PackedMoE.from_experts(...)   one layer's integer-format experts, stacked per format (layout.py)
    quantized_moe(x, ...)         the layer's routed-expert output (moe.py)

Importing this package does not import triton; the Triton path imports the kernels on first use.
"""

if __name__ == "kernels":
    # Imported as the top-level `kernels`: Python was started from the repository root (`python -m ...` puts
    # the working directory on sys.path), where this folder shadows the Hugging Face `kernels` package that
    # transformers imports. This folder is moequant.kernels: hand the name to the installed package.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    )
    if _spec is None:
        del _sys.modules["kernels"]
        raise ImportError("No module named 'kernels' (the repository's kernels/ folder is moequant.kernels)",
                          name="kernels")  # fmt: skip
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_real)
else:
    from moequant.kernels.backend import ENV_VAR, Backend, resolve_backend
    from moequant.kernels.layout import PackedMoE, WidthGroup
    from moequant.kernels.moe import quantized_moe
    from moequant.kernels.tuning import KernelConfig

    __all__ = [
        "ENV_VAR",
        "Backend",
        "KernelConfig",
        "PackedMoE",
        "WidthGroup",
        "quantized_moe",
        "resolve_backend",
    ]
