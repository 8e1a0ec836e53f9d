"""Pure-torch reference of every kernel: the definition the Triton kernels are tested against, and the
CPU path of the quantized experts.

Weights are dequantized with `moequant.quantizers.packing.dequantize` (once per hit expert per call) and every
product runs in float32: loop over the experts that received pairs, one matmul each.

    routed_terms         the reference MoE forward's terms, expert by expert (w * expert(x) per routed token),
                         experts ascending: the one routed sum of the project (QuantizedExperts' CPU path,
                         the profile and quantize passes' layer outputs, the probe's experts)
    routed_sum           y [T, H] float32: routed_terms of one batch, added up
    moe_align_reference  top_k_index -> SortedRouting (routing.py)
    gemm1_reference      x, routing -> act [P, I] float32 = act_fn(x_t @ W_gu^T + b1)   per pair
                         (W_gu [2I, H] = [gate; up], or up [I, H] for a non-gated activation: apply_activation
                         reads either)
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
    gate_up_bias: torch.Tensor | None,  # [E, 2I]; [E, I] non-gated
) -> torch.Tensor:
    """-> act [P, I] float32; rows of pairs routed to non-packed experts are 0."""
    k = top_k_index.shape[1]
    act = torch.zeros(
        top_k_index.numel(), packed.intermediate, dtype=torch.float32, device=x.device
    )  # [P, I]
    for g, s, e, pairs in _hit_experts(top_k_index, packed.gate_up):
        w = g.dequantize(s).to(x.device)  # [2I, H]; [I, H] non-gated
        h = x[pairs // k].float() @ w.T  # [n, 2I]; [n, I] non-gated
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


ExpertFn = Callable[[int, list[torch.Tensor]], list[torch.Tensor]]
"""(e, token sets [x [Te, H] float32, ...]) -> [y [Te, H] float32, ...]: expert e on each set, before the routing
weight; the weights may be read or dequantized once for all the sets of one call."""

_TOKEN_GROUP_BYTES = 16 * 2**20  # float32 activations of the token sets that share one pass over a weight


def token_groups(sizes: list[int], row_elems: int, budget: int | None = None) -> list[list[int]]:
    """Consecutive token sets (of `sizes` rows) grouped so that a group's float32 activations, `row_elems`
    per row, stay near `budget`: the sets of a group share one pass over an expert's weights. A set is never
    split (each is computed as the forward computes it); every group has at least one."""
    budget = _TOKEN_GROUP_BYTES if budget is None else budget
    groups: list[list[int]] = []
    used = budget
    for i, n in enumerate(sizes):
        if used + n * row_elems * 4 > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n * row_elems * 4
    return groups


def routed_terms(
    xs: list[torch.Tensor],  # [T_b, H] per batch
    idxs: list[torch.Tensor],  # [T_b, k] per batch
    weights: list[torch.Tensor],  # [T_b, k] per batch
    expert_fn: ExpertFn,
    experts: Iterable[int],
    row_elems: int | None = None,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The terms of the routed MoE sum y_t = sum_k w_tk f_{idx_tk}(x_t), expert by expert:
    (e, batch b, token rows [Te], w * f_e(x_b[rows]) [Te, H] float32) for each expert e among `experts` that a
    batch routes to, experts ascending, batches in order. Each expert runs once over all of its batches' tokens
    (token_groups of `row_elems` float32 values per row bound one call's activations; None: one call).
    Adding the terms in this order with index_add is the reference forward: every caller's outputs agree with
    it bit for bit (QuantizedExperts, the profile and quantize passes, the probe)."""
    if not idxs:
        return
    hit = set(torch.unique(torch.cat([i.reshape(-1) for i in idxs])).tolist())
    for e in sorted(set(experts) & hit):
        hits = [(b, *torch.where(idx == e)) for b, idx in enumerate(idxs)]  # (batch, token rows, slots)
        hits = [(b, tok, pos) for b, tok, pos in hits if tok.numel()]
        sizes = [tok.numel() for _, tok, _ in hits]
        groups = [list(range(len(hits)))] if row_elems is None else token_groups(sizes, row_elems)
        for group in groups:
            part = [hits[g] for g in group]
            ys = expert_fn(e, [xs[b][tok].float() for b, tok, _ in part])  # [Te, H] float32 per batch
            for (b, tok, pos), y in zip(part, ys, strict=True):
                yield e, b, tok, y * weights[b][tok, pos, None].float()
            del ys


def add_terms(outs: list[torch.Tensor], terms) -> list[torch.Tensor]:
    """outs[b] [T_b, H] float32 += each term (e, b, rows, y) of routed_terms, in the order given."""
    for _, b, tok, y in terms:
        outs[b].index_add_(0, tok.to(outs[b].device), y.to(outs[b].device))
    return outs


def routed_sum(
    x: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    expert_fn: ExpertFn,
    experts: Iterable[int],
) -> torch.Tensor:
    """-> y [T, H] float32: the routed sum (routed_terms) of one batch over `experts`; others contribute 0."""
    T = x.shape[0]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    terms = routed_terms(
        [x], [top_k_index.reshape(T, -1)], [top_k_weights.reshape(T, -1)], expert_fn, experts
    )
    return add_terms([out], terms)[0]


def packed_expert_fn(
    packed: PackedMoE,
    activation: Activation,
    act_params: dict | None,
    gate_up_bias: torch.Tensor | None,  # [E, 2I]; [E, I] non-gated
    down_bias: torch.Tensor | None,  # [E, H]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """An ExpertFn: packed expert e, dequantized once per call, in float32."""
    gu = {e: (g, s) for g in packed.gate_up for s, e in enumerate(g.experts)}
    dn = {e: (g, s) for g in packed.down for s, e in enumerate(g.experts)}

    def run(e: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        (g1, s1), (g2, s2) = gu[e], dn[e]
        w1, w2 = g1.dequantize(s1), g2.dequantize(s2)  # [2I, H] ([I, H] non-gated), [H, I]
        out = []
        for xe in xs:
            h = xe @ w1.to(xe.device).T  # [Te, 2I]; [Te, I] non-gated
            if gate_up_bias is not None:
                h = h + gate_up_bias[e].float()
            o = apply_activation(activation, h, act_params) @ w2.to(xe.device).T  # [Te, H]
            out.append(o if down_bias is None else o + down_bias[e].float())
        return out

    return run


def moe_reference(
    x: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    packed: PackedMoE,
    activation: Activation,
    act_params: dict | None = None,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]; [E, I] non-gated
    down_bias: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:
    """-> y [T, H] in x's dtype: the packed experts' routed sum (routed_sum); other experts contribute 0."""
    if packed.num_global == 0 or x.shape[0] == 0:
        return torch.zeros_like(x)
    run = packed_expert_fn(packed, activation, act_params, gate_up_bias, down_bias)
    experts = [e for g in packed.gate_up for e in g.experts]
    return routed_sum(x, top_k_index, top_k_weights, run, experts).to(x.dtype)  # [T, H]
