"""Pure-torch reference of every kernel: the definition the Triton kernels are tested against, and the
CPU path of the quantized experts.

Weights are dequantized with `moequant.quantizers.packing.dequantize` (once per hit expert per call) and every
product runs in float32: loop over the experts that received pairs, one matmul each.

    routed_sum           the reference MoE forward: y [T, H] float32 = sum over slots of w * expert(x),
                         experts in ascending order (also QuantizedExperts' CPU path, any storage method)
    moe_align_reference  top_k_index -> SortedRouting (routing.py)
    gemm1_reference      x, routing -> act [P, I] float32 = act_fn(x_t @ W_gu^T + b1)   per pair
    gemm2_reference      act -> out [P, H] float32 = w_p * (act_p @ W_down^T + b2)    per pair
    moe_reference        -> y [T, H] in x's dtype: routed_sum over the packed experts
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from moequant.arch.base import Activation, apply_activation
from moequant.kernels.layout import PackedMoE, WidthGroup
from moequant.kernels.routing import SortedRouting, max_blocks


def moe_align_reference(
    top_k_index: torch.Tensor,  # [T, k] int
    expert_to_global: torch.Tensor,  # [E] int32, -1 for experts not packed
    num_global: int,
    block_m: int,
) -> SortedRouting:
    flat = top_k_index.reshape(-1).long()  # [P]
    p = flat.numel()
    dev = flat.device
    gid = expert_to_global.to(dev).long()[flat]  # [P] global id or -1
    valid = gid >= 0  # [P]
    key = torch.where(valid, gid, num_global)  # [P] non-packed pairs sort last
    counts = torch.bincount(key, minlength=num_global + 1)[:num_global]  # [num_global]
    blocks = (counts + block_m - 1) // block_m  # [num_global]
    block_start = torch.zeros(num_global + 1, dtype=torch.int64, device=dev)
    block_start[1:] = blocks.cumsum(0)
    raw_start = counts.cumsum(0) - counts  # [num_global] first sorted position of each expert
    order = torch.argsort(key, stable=True)  # [P] ascending pair id within each expert
    n_valid = int(counts.sum())
    order = order[:n_valid]  # [n_valid]
    e_sorted = key[order]  # [n_valid]
    rank = torch.arange(n_valid, device=dev) - raw_start[e_sorted]  # [n_valid] position within expert
    dest = block_start[e_sorted] * block_m + rank  # [n_valid]
    sorted_ids = torch.full(
        (max(max_blocks(p, num_global, block_m), 1) * block_m,), p, dtype=torch.int32, device=dev
    )
    sorted_ids[dest] = order.to(torch.int32)
    return SortedRouting(
        sorted_ids=sorted_ids, block_start=block_start.to(torch.int32), block_m=block_m, num_pairs=p
    )


def _hit_experts(
    top_k_index: torch.Tensor, groups: tuple[WidthGroup, ...]
) -> Iterator[tuple[WidthGroup, int, int, torch.Tensor]]:
    """(group, slot, expert, pair ids) for every packed expert that received at least one pair."""
    where = {e: (g, s) for g in groups for s, e in enumerate(g.experts)}
    flat = top_k_index.reshape(-1).long()  # [P]
    order = torch.argsort(flat, stable=True)  # [P]
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    start = 0
    for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
        if e in where:
            g, s = where[e]
            yield g, s, e, order[start : start + c]
        start += c


def gemm1_reference(
    x: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    packed: PackedMoE,
    activation: Activation,
    act_params: dict | None,
    gate_up_bias: torch.Tensor | None,  # [E, 2I]
) -> torch.Tensor:
    """-> act [P, I] float32; rows of pairs routed to non-packed experts are 0."""
    k = top_k_index.shape[1]
    act = torch.zeros(
        top_k_index.numel(), packed.intermediate, dtype=torch.float32, device=x.device
    )  # [P, I]
    for g, s, e, pairs in _hit_experts(top_k_index, packed.gate_up):
        w = g.dequantize(s).to(x.device)  # [2I, H]
        h = x[pairs // k].float() @ w.T  # [n, 2I]
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].float()
        act[pairs] = apply_activation(activation, h, act_params)  # [n, I]
    return act


def gemm2_reference(
    act: torch.Tensor,  # [P, I]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    packed: PackedMoE,
    down_bias: torch.Tensor | None,  # [E, H]
) -> torch.Tensor:
    """-> out [P, H] float32 = routing weight * (act @ W_down^T + b2); 0 for non-packed pairs."""
    weights = top_k_weights.reshape(-1).float()  # [P]
    out = torch.zeros(act.shape[0], packed.hidden, dtype=torch.float32, device=act.device)  # [P, H]
    for g, s, e, pairs in _hit_experts(top_k_index, packed.down):
        w = g.dequantize(s).to(act.device)  # [H, I]
        o = act[pairs].float() @ w.T  # [n, H]
        if down_bias is not None:
            o = o + down_bias[e].float()
        out[pairs] = o * weights[pairs, None]
    return out


def routed_sum(
    x: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    experts: Iterable[int],
    num_experts: int,
) -> torch.Tensor:
    """-> y [T, H] float32: for each hit expert e among `experts` (ascending), expert_fn(e, x_e [Te, H] float32)
    -> [Te, H] float32 on the tokens routed to e (in token order), weighted and accumulated with index_add."""
    T = x.shape[0]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    xf = x.float()  # [T, H]
    wanted = torch.zeros(num_experts + 1, dtype=torch.bool, device=x.device)  # [E + 1] (index E: masked)
    wanted[list(experts)] = True
    idx = top_k_index.reshape(T, -1)  # [T, k]
    weights = top_k_weights.reshape(T, -1)  # [T, k]
    for e in torch.unique(idx[wanted[idx.clamp(0, num_experts)]]).tolist():
        tok, pos = torch.where(idx == e)  # [Te], [Te]
        out.index_add_(0, tok, expert_fn(e, xf[tok]) * weights[tok, pos, None].float())
    return out


def packed_expert_fn(
    packed: PackedMoE,
    activation: Activation,
    act_params: dict | None,
    gate_up_bias: torch.Tensor | None,  # [E, 2I]
    down_bias: torch.Tensor | None,  # [E, H]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """(e, x [Te, H] float32) -> [Te, H] float32: packed expert e, dequantized, in float32."""
    gu = {e: (g, s) for g in packed.gate_up for s, e in enumerate(g.experts)}
    dn = {e: (g, s) for g in packed.down for s, e in enumerate(g.experts)}

    def run(e: int, xe: torch.Tensor) -> torch.Tensor:
        g, s = gu[e]
        h = xe @ g.dequantize(s).to(xe.device).T  # [Te, 2I]
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].float()
        g, s = dn[e]
        o = apply_activation(activation, h, act_params) @ g.dequantize(s).to(xe.device).T  # [Te, H]
        return o if down_bias is None else o + down_bias[e].float()

    return run


def moe_reference(
    x: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    packed: PackedMoE,
    activation: Activation,
    act_params: dict | None = None,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:
    """-> y [T, H] in x's dtype: the packed experts' routed sum (routed_sum); other experts contribute 0."""
    if packed.num_global == 0 or x.shape[0] == 0:
        return torch.zeros_like(x)
    run = packed_expert_fn(packed, activation, act_params, gate_up_bias, down_bias)
    experts = [e for g in packed.gate_up for e in g.experts]
    return routed_sum(x, top_k_index, top_k_weights, run, experts, packed.num_experts).to(x.dtype)  # [T, H]
