"""Entry point: one quantized MoE layer's routed experts, on the Triton kernels or the torch reference.

    y[t] = sum over slots j with top_k_index[t, j] packed of
           top_k_weights[t, j] * (down(act(gate_up(x[t]) + b1)) + b2)
    gate_up is [gate; up] for a gated activation (act: GLU) and up alone for a non-gated one (relu2), as
    `packed.gated` says; the activation must agree with it.

Triton path (CUDA-graph safe: no host synchronisation, grid sizes from host-side bounds):
    pairs few (decode)  -> direct: gemm1 and gemm2 read each pair's expert from top_k_index
    otherwise           -> sort.moe_align, then gemm1 and gemm2 over per-expert row blocks
    gemm1 writes act [P, I] in x's dtype, gemm2 writes weighted outputs [P, H] in fp32, and the sum
    over the top-k slots runs in a fixed order (deterministic).
"""

from __future__ import annotations

import logging

import torch

from moequant.arch.base import Activation
from moequant.kernels.backend import Backend, resolve_backend
from moequant.kernels.layout import PackedMoE
from moequant.kernels.reference import moe_reference
from moequant.kernels.tuning import KernelConfig, global_p2, sorted_block_m, use_direct

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantized_moe(
    x: torch.Tensor,  # [T, H] float16 / bfloat16 / float32
    top_k_index: torch.Tensor,  # [T, k] int
    top_k_weights: torch.Tensor,  # [T, k] float
    packed: PackedMoE,
    activation: Activation,
    act_params: dict | None = None,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I] canonical [gate | up]; [E, I] non-gated
    down_bias: torch.Tensor | None = None,  # [E, H]
    backend: str | Backend | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """-> y [T, H] in x's dtype; slots routed to experts not in `packed` contribute 0.

    backend: "triton" | "reference" | None (MOEQUANT_KERNEL if set, else Triton on CUDA, reference elsewhere).
    """
    _check(x, top_k_index, top_k_weights, packed, activation)
    chosen = resolve_backend(backend, x.device)
    if chosen is Backend.REFERENCE:
        return moe_reference(
            x, top_k_index, top_k_weights, packed, activation, act_params, gate_up_bias, down_bias
        )  # [T, H]
    return _triton_moe(
        x, top_k_index, top_k_weights, packed, activation, act_params, gate_up_bias, down_bias, config
    )


def _check(x, top_k_index, top_k_weights, packed: PackedMoE, activation: Activation) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be [T, H] in float16/bfloat16/float32, got {tuple(x.shape)} {x.dtype}")
    if (
        top_k_index.dim() != 2
        or top_k_index.shape != top_k_weights.shape
        or top_k_index.shape[0] != x.shape[0]
    ):
        raise ValueError(
            f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
            f"must both be [T={x.shape[0]}, k]"
        )
    if packed.num_global and x.shape[1] != packed.hidden:
        raise ValueError(f"x has {x.shape[1]} features, the experts expect {packed.hidden}")
    if activation.gated != packed.gated:
        raise ValueError(
            f"activation {activation.value} is {'' if activation.gated else 'non-'}gated, the packed experts' "
            f"gate_up is laid out {'' if packed.gated else 'non-'}gated (PackedMoE.from_experts(gated=...))"
        )


def _triton_moe(
    x, top_k_index, top_k_weights, packed, activation, act_params, gate_up_bias, down_bias, config
):
    t, k = top_k_index.shape
    if t == 0 or packed.num_global == 0:
        return torch.zeros_like(x)
    if packed.device != x.device:
        raise ValueError(f"packed experts are on {packed.device}, x on {x.device}: call packed.to(device)")
    cfg = config or KernelConfig()
    from moequant.kernels import gemm, sort  # imports triton: only on this path

    x = x.contiguous()
    topk = top_k_index.reshape(-1).contiguous()  # [P]
    weights = top_k_weights.reshape(-1).contiguous()  # [P]
    p = topk.numel()
    b1 = None if gate_up_bias is None else gate_up_bias.contiguous()  # [E, 2I] or [E, I] non-gated
    b2 = None if down_bias is None else down_bias.contiguous()  # [E, H]
    routing = None
    if not use_direct(p, packed.num_experts, cfg):
        block_m = sorted_block_m(p, packed.num_experts, cfg)
        routing = sort.moe_align(topk, packed.expert_to_global, packed.num_global, block_m, global_p2(packed))
    act = torch.empty(p, packed.intermediate, dtype=x.dtype, device=x.device)  # [P, I]
    gemm.gemm1(x, act, topk, packed, routing, activation, act_params, b1, cfg)
    out = torch.zeros(p, packed.hidden, dtype=torch.float32, device=x.device)  # [P, H]
    gemm.gemm2(act, out, weights, topk, packed, routing, b2, cfg)
    return out.view(t, k, packed.hidden).sum(1).to(x.dtype)  # [T, H] fixed-order sum over the top-k
