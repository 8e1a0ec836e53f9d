"""Quantize the experts of one MoE block from the calibration activations that reach it.

1. Run the layer on every calibration batch up to its experts module (a pre-hook records the experts'
   inputs and routing, then stops the layer).
2. Experts go in chunks (same spec, working memory near `gptq_chunk_mb`; chunks.py); per chunk: gate/up
   Hessians from the routed tokens, gate/up quantized in one batched call, down-projection Hessians from
   act(quantized gate/up(x)) on the same tokens ("true sequential"; the original gate/up when it is off),
   down quantized (expert_hessians.py, methods.py).
3. Return a QuantizedExperts module, the report rows (rows.py) and the module's outputs on the recorded inputs
   (expert_outputs.py): the caller lets the layer read them (`PrecomputedExperts`) to produce the next
   layer's inputs, then swaps the QuantizedExperts in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from moequant.arch import ExpertWeights, MoEArch, MoEBlockRef
from moequant.calibration.capture import LayerInputs
from moequant.calibration.expert_io import ExpertInputs, collect_expert_inputs, gathered_expert_inputs
from moequant.calibration.memo import ForwardMemo
from moequant.calibration.stats import routed_slots
from moequant.config import CalibMode, Method, QuantizeConfig, QuantSpec, Spec, expert_spec, proj_specs
from moequant.errors import MoEQuantError
from moequant.modules.qexperts import QuantizedExperts
from moequant.quantize.assign import assign_experts, expert_costs
from moequant.quantize.chunks import chunk_bytes, chunk_weights, expert_chunks, per_expert_bytes
from moequant.quantize.expert_hessians import down_hessians, gate_up_hessians
from moequant.quantize.expert_outputs import DownInputs, expert_outputs
from moequant.quantize.methods import (
    HandlerOptions,
    learns_experts,
    needs_hessian,
    needs_tokens,
    quantize_stack_measured,
)
from moequant.quantize.rows import ExpertRow
from moequant.quantize.signround import signround_chunk
from moequant.quantize.weight_error import err_sums, rel_err
from moequant.runtime.devices import available_bytes
from moequant.runtime.memory import release_free_memory
from moequant.runtime.ranks import Ranks, current

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedExpert:
    """One expert as quantized: its gate/up and down storage modules, their handler diagnostics, and its
    relative weight error over both projections."""

    gate_up: nn.Module
    down: nn.Module
    gate_up_diag: dict
    down_diag: dict
    rel_err: float

    def to(self, device) -> QuantizedExpert:
        return replace(self, gate_up=self.gate_up.to(device), down=self.down.to(device))


@dataclass(frozen=True)
class _Block:
    """What every chunk of one block's experts reads: the block, its weights (meta when read lazily), the
    recorded batches (x [T, H], idx [T, k], w [T, k]), the options, the activation's parameters and, for
    signround's block target, the layer's drift per batch ([T, H], quantize/drift.py)."""

    arch: MoEArch
    ref: MoEBlockRef
    w: ExpertWeights
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    config: QuantizeConfig
    options: HandlerOptions
    act_params: dict
    read_experts: Callable[[list[int]], dict[str, torch.Tensor]] | None
    drift: list[torch.Tensor] | None = None
    down_inputs: DownInputs | None = None  # filled by the down Hessians (_keeps_down_inputs)


@torch.no_grad()
def quantize_block(
    arch: MoEArch,
    layer,
    ref: MoEBlockRef,
    inputs: LayerInputs,
    specs: list[Spec],
    config: QuantizeConfig,
    storage_dtype: torch.dtype,
    read_experts: Callable[[list[int]], dict[str, torch.Tensor]] | None = None,
    drift: list[torch.Tensor] | None = None,
    memo: ForwardMemo | None = None,
) -> tuple[QuantizedExperts, list[ExpertRow], list[torch.Tensor]]:
    """Quantize the block's experts chunk by chunk: a chunk's gate/up Hessians, its gate/up, its down
    Hessians (through the quantized gate/up), its down projections; only one chunk's Hessians exist at a
    time. Results do not depend on the chunking (batched GPTQ equals per-expert calls bit for bit).

    `read_experts(ids)` gives the fused expert weights of those experts ({parameter name: [len(ids), ...]},
    CheckpointSource.read_experts) when the block's own are not loaded (meta); else they are sliced from it.

    Returns the quantized module, the report rows, and the quantized experts' output for every calibration
    batch (what the layer needs to compute the next layer's inputs). `memo` records what the layer's attention
    returns on the way to the experts, for that run of the layer (calibration/memo.py)."""
    w: ExpertWeights = arch.expert_weights(ref.experts)  # meta tensors (shapes only) when read lazily
    if w.gate_up.device.type == "meta" and read_experts is None:
        raise ValueError("the block's expert weights are not loaded and no read_experts was given")
    act_params = arch.activation_params(ref.experts)
    ranks = current()
    own = collect_expert_inputs(layer, ref, inputs, memo)  # this rank's batches (every batch on one rank)
    feats = gathered_expert_inputs(own, inputs, ranks)  # every batch: what the experts' Hessians read
    device = feats.x[0].device  # where the layer computed: Hessians, GPTQ and outputs run there too
    routed = _routed_tokens(feats, w.num_experts)  # [E]
    used, notes = _plan_methods(specs, routed, config)
    costs = expert_costs(
        routed.tolist(), w.hidden, w.intermediate, w.in_rows, [_needs_hessian(s) for s in used]
    )
    owner = assign_experts(costs, ranks.world)  # rank per expert
    mine = [e for e in range(w.num_experts) if owner[e] == ranks.rank]
    options = HandlerOptions(config.gptq, storage_dtype, consume_hessian=True)  # Hessians freed after GPTQ
    batches = list(zip(feats.x, feats.idx, feats.w, strict=True))
    keeps = _keeps_down_inputs(w, feats, routed, config, inputs)
    keep = DownInputs(frozenset(inputs.mine())) if keeps else None  # this rank's batches
    block = _Block(arch, ref, w, batches, config, options, act_params, read_experts, drift, keep)
    done: dict[int, QuantizedExpert] = {}
    with ranks.guard(f"quantizing the experts of layer {ref.layer_idx}"):  # this rank's experts only
        for part in expert_chunks(
            used, per_expert_bytes(w.hidden, w.intermediate, w.in_rows), chunk_bytes(config, device), mine
        ):
            done |= _quantize_chunk(block, part, used[part[0]])  # fmt: skip
    del block, batches
    if ranks.distributed:  # every rank gets every expert's result (the writer stores them all)
        done = _gathered(done, ranks, device)
    qe = _assemble(arch, w, used, done, config, storage_dtype, act_params)
    qe.carry(arch.carried_modules(ref.experts))  # the family's other expert tensors keep their keys
    rows = [
        ExpertRow.of(
            ref.layer_idx,
            e,
            int(routed[e]),
            specs[e],
            used[e],
            rel_weight_error=done[e].rel_err,
            rank=owner[e],
            note=notes[e],
            gate_up_diag=done[e].gate_up_diag or {},
            down_diag=done[e].down_diag or {},
        )  # fmt: skip
        for e in range(w.num_experts)
    ]
    return qe, rows, expert_outputs(qe, own, keep)  # this rank's batches: the ones its layer forward runs


def _keeps_down_inputs(
    w: ExpertWeights, feats: ExpertInputs, routed: torch.Tensor, config: QuantizeConfig, inputs
) -> bool:
    """Whether the down Hessians keep their inputs for the layer's outputs (of this process's batches; under
    torchrun those of its own experts on its own batches): through the quantized gate/up (true sequential), on
    exactly the routed tokens (every slot routes; routed mode), without a gate/up bias (the stored module's is
    cast to the storage dtype), activations not offloaded, and within keep_down_inputs_mb and half the memory
    still available where they live (float32, every routed token: a bound for any rank)."""
    size = int(routed.sum()) * w.intermediate * 4  # bytes
    if not (
        config.true_sequential
        and config.calib_mode is CalibMode.ROUTED
        and w.gate_up_bias is None
        and inputs.offload_to is None
        and size <= config.keep_down_inputs_mb * 2**20
        and all(bool(routed_slots(wts).all()) for wts in feats.w)
    ):
        return False
    room = (
        available_bytes(feats.x[0].device) if feats.x else None
    )  # read last: it reads /proc and cgroup files
    return room is None or size <= room // 2


def _routed_tokens(feats: ExpertInputs, num_experts: int) -> torch.Tensor:
    """Calibration tokens routed to each expert over the recorded batches: [E] int64 on the CPU (slots of weight 0
    route nowhere: calibration.stats.routed_slots)."""
    routed = torch.zeros(num_experts, dtype=torch.int64)
    for idx, w in zip(feats.idx, feats.w, strict=True):
        routed += torch.bincount(idx[routed_slots(w)], minlength=num_experts)[:num_experts].cpu()
    return routed


def _needs_hessian(spec: Spec) -> bool:
    return any(needs_hessian(p.method) for p in proj_specs(spec))


def _needs_tokens(spec: Spec) -> bool:
    return any(needs_tokens(p.method) for p in proj_specs(spec))


def _rtn_fallback(spec: Spec) -> Spec:
    """`spec` with every method that reads calibration tokens replaced by RTN at the same width and grid."""
    gu, dn = (
        QuantSpec(Method.RTN, p.bits, p.group_size, p.sym) if needs_tokens(p.method) else p
        for p in proj_specs(spec)
    )
    return expert_spec(gu, dn)


def _plan_methods(
    specs: list[Spec], tokens: torch.Tensor, config: QuantizeConfig
) -> tuple[list[Spec], list[str]]:
    """Specs actually used (methods that read tokens fall back to RTN on too few routed tokens) and the reason."""
    used, notes = [], []
    for e, spec in enumerate(specs):
        if (
            _needs_tokens(spec)
            and config.calib_mode is CalibMode.ROUTED
            and int(tokens[e]) < config.min_tokens
        ):
            used.append(_rtn_fallback(spec))
            notes.append(
                f"fallback: {int(tokens[e])} routed tokens < {config.min_tokens}, identity-Hessian RTN"
            )
        else:
            used.append(spec)
            notes.append("")
    return used, notes


def _quantize_chunk(block: _Block, part: list[int], spec: Spec) -> dict[int, QuantizedExpert]:
    """One chunk of experts (same spec, per projection): its gate/up Hessians, its gate/up, its down Hessians
    (through the quantized gate/up), its down projections. Running out of memory says what to lower."""
    try:
        return _quantize_chunk_in_memory(block, part, spec)
    except (torch.OutOfMemoryError, MemoryError):
        config = block.config
        raise MoEQuantError(
            f"out of memory quantizing experts {part[0]}..{part[-1]} of layer {block.ref.layer_idx} ({len(part)} "
            f"at once, chunk budget {config.gptq_chunk_mb} MB); lower --gptq-chunk-mb, pass --offload-activations, "
            "or lower --samples / --seq-len"
        ) from None


def _quantize_chunk_in_memory(b: _Block, part: list[int], spec: Spec) -> dict[int, QuantizedExpert]:
    gu_spec, dn_spec = proj_specs(spec)
    wc = chunk_weights(b.arch, b.ref.experts, b.w, part, b.read_experts)  # this chunk's experts only
    hessian = needs_hessian(gu_spec.method)
    h = (
        gate_up_hessians(part, b.w.hidden, b.batches, b.config, wc.down.device) if hessian else None
    )  # [Ec, H, H]
    gu_mods, gu_diags, gu_sums = quantize_stack_measured(wc.gate_up, h, gu_spec, b.options)  # W [Ec, 2I, H]
    del h
    learns = (learns_experts(gu_spec.method), learns_experts(dn_spec.method))
    gate_up = wc.gate_up if any(learns) else None  # [Ec, 2I, H] the original, kept for SignRound only
    gu_err = [
        _plus((0.0, 0.0), gu_sums[j], wc.gate_up[j], gu_mods[j]) for j in range(len(part))
    ]  # (num, den)
    if b.config.true_sequential:  # the down Hessians read the quantized gate/up: drop the original now
        wc = replace(wc, gate_up=wc.gate_up.to("meta"))  # (its shape still gives the hidden size)
    hessian = needs_hessian(dn_spec.method)
    gu_of = dict(zip(part, gu_mods, strict=True))  # expert -> its quantized gate/up
    keep = None if any(learns) else b.down_inputs  # learned experts change their gate/up after this
    h = down_hessians(b.arch, wc, part, gu_of, b.batches, b.config, b.act_params, keep) if hessian else None
    dn_mods, dn_diags, dn_sums = quantize_stack_measured(wc.down, h, dn_spec, b.options)  # W [Ec, H, I]
    del h
    if any(learns):  # both projections against the experts' outputs (quantize/signround.py)
        gu_mods, dn_mods, won = signround_chunk(
            b.arch, replace(wc, gate_up=gate_up), part, (gu_spec, dn_spec), (gu_mods, dn_mods), learns,
            b.batches, b.config, b.act_params, seed=b.ref.layer_idx, drift=b.drift,
        )  # fmt: skip
        gu_err = [err_sums(gate_up[j], gu_mods[j]) for j in range(len(part))]
        kept = ["learned" if w else "start" for w in won]  # quant_report: which candidate each expert stored
        gu_diags = [d | {"signround": k} for d, k in zip(gu_diags, kept, strict=True)]
        dn_diags = [d | {"signround": k} for d, k in zip(dn_diags, kept, strict=True)]
    del gate_up
    out = {
        e: QuantizedExpert(
            gu_mods[j],
            dn_mods[j],
            gu_diags[j],
            dn_diags[j],
            rel_err(*_plus(gu_err[j], dn_sums[j] if not any(learns) else None, wc.down[j], dn_mods[j])),
        )  # fmt: skip
        for j, e in enumerate(part)
    }
    del gu_mods, dn_mods, gu_diags, dn_diags, wc
    release_free_memory()  # the chunk's temporaries, before the next chunk allocates its own
    return out


def _plus(acc, sums, W: torch.Tensor, mod) -> tuple:
    """acc (num, den) plus one projection's (sum (W - Q)^2, sum W^2): `sums` as its quantizer summed them, or
    (None) from its storage."""
    if sums is None:
        return err_sums(W, mod, *acc)
    return acc[0] + sums[0], acc[1] + sums[1]


def _gathered(done: dict[int, QuantizedExpert], ranks: Ranks, device) -> dict[int, QuantizedExpert]:
    """Every rank's experts on every rank (sent through the CPU, placed back on `device`)."""
    out: dict[int, QuantizedExpert] = {}
    for got in ranks.all_gather({e: q.to("cpu") for e, q in done.items()}):
        out |= {e: q.to(device) for e, q in got.items()}
    return out


def empty_experts(
    arch: MoEArch, w: ExpertWeights, specs, config, storage_dtype, act_params
) -> QuantizedExperts:
    """The block's QuantizedExperts at `specs` on the meta device: its storage is set (quantize_block) or
    loaded from a shard (resume.replay_pass)."""
    return QuantizedExperts(
        specs,
        w.hidden,
        w.intermediate,
        arch.activation,
        act_params,
        has_bias=arch.has_bias,
        act_order=config.stores_g_idx,
        dtype=storage_dtype,
        device="meta",
    )


def _assemble(arch, w: ExpertWeights, used, done, config, storage_dtype, act_params) -> QuantizedExperts:
    """The block's QuantizedExperts from each expert's storage modules (biases copied from the block)."""
    qe = empty_experts(arch, w, used, config, storage_dtype, act_params)
    for e in range(len(used)):
        qe.set_expert(e, done[e].gate_up, done[e].down, used[e])
    if arch.has_bias:
        qe.gate_up_bias = w.gate_up_bias.to(storage_dtype).clone()
        qe.down_bias = w.down_bias.to(storage_dtype).clone()
    return qe
