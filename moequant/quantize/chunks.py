"""How much of a layer's expert work goes at once: chunks of experts within a working-memory budget, the
weights of one chunk, and the float32 values a token costs when token groups are budgeted."""

from __future__ import annotations

import torch

from moequant.arch import ExpertWeights, MoEArch
from moequant.config import QuantizeConfig, Spec
from moequant.runtime.devices import free_bytes

_DEVICE_SHARE = 0.5  # of an accelerator's free memory, what one chunk of experts may plan for


def expert_chunks(
    specs: list[Spec], per_expert_bytes: int, chunk_bytes: int, experts: list[int] | None = None
) -> list[list[int]]:
    """Experts (default all; else those in `experts`, e.g. one rank's) grouped by spec (one batched call per
    group), each group cut into chunks whose working memory (weights, solver buffers, Hessians) stays near
    `chunk_bytes`."""
    groups: dict[Spec, list[int]] = {}
    for e in range(len(specs)) if experts is None else experts:
        groups.setdefault(specs[e], []).append(e)
    size = max(1, chunk_bytes // max(per_expert_bytes, 1))
    return [ids[c : c + size] for ids in groups.values() for c in range(0, len(ids), size)]


def per_expert_bytes(hidden: int, intermediate: int, in_rows: int) -> int:
    """Working memory of one expert in a chunk: the fp32 copy of its input projection (in_rows x H: 2I, or I
    for up alone) plus the solver's three weight-sized buffers, and both Hessians."""
    return in_rows * hidden * 4 * 4 + (hidden * hidden + intermediate * intermediate) * 4


def chunk_bytes(config: QuantizeConfig, device: torch.device) -> int:
    """Working memory one chunk of experts may take: config.gptq_chunk_mb, capped on an accelerator at half
    of its free memory (measured when the layer starts: the layer and activations are already there)."""
    budget = config.gptq_chunk_mb * 2**20
    free = free_bytes(device)
    if free is not None:
        budget = min(budget, int(free * _DEVICE_SHARE)) if budget else int(free * _DEVICE_SHARE)
    return budget


def row_elems(hidden: int, in_rows: int) -> int:
    """float32 values per token that kernels/reference.token_groups budgets: its input [H] and its input
    projection's output [in_rows] (2I gate/up, or I up alone)."""
    return in_rows + hidden


def take(t: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """t[ids] along dim 0: a view when the ids are a contiguous range (no copy of a [E, K, K] Hessian)."""
    if ids == list(range(ids[0], ids[-1] + 1)):
        return t[ids[0] : ids[-1] + 1]
    return t[torch.tensor(ids)]


def chunk_weights(arch: MoEArch, experts, w: ExpertWeights, part: list[int], read_experts) -> ExpertWeights:
    """Canonical weights of the experts in `part` ([len(part), ...] each): slices of the loaded block `w`,
    or, when its weights are not loaded, what `read_experts(part)` reads (in the module's layout)."""
    if read_experts is None:
        gub = None if w.gate_up_bias is None else take(w.gate_up_bias, part)  # [Ec, 2I] ([Ec, I] non-gated)
        db = None if w.down_bias is None else take(w.down_bias, part)  # [Ec, H]
        return ExpertWeights(take(w.gate_up, part), take(w.down, part), gub, db)
    fused = read_experts(part)
    for name in (f"{arch.in_proj}_bias", "down_proj_bias") if arch.has_bias else ():
        fused[name] = take(getattr(experts, name), part)  # biases load with the layer (small)
    return arch.canonical_from_fused(fused)
