"""Runtime of quantized MoE experts: fused dequant-GEMM Triton kernels and their torch reference.

    PackedMoE.from_experts(...)   one layer's integer-format experts, stacked per format (layout.py)
    quantized_moe(x, ...)         the layer's routed-expert output (moe.py)

Importing this package does not import triton; the Triton path imports the kernels on first use.
"""

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
