"""Quantize the experts of one MoE block from the calibration activations that reach it.

1. Run the layer on every calibration batch up to its experts module (a pre-hook records the experts'
   inputs and routing, then stops the layer).
2. Experts go in chunks (same spec, working memory near `gptq_chunk_mb`); per chunk: gate/up Hessians from
   the routed tokens, gate/up quantized in one batched call, down-projection Hessians from act(quantized
   gate/up(x)) on the same tokens ("true sequential"; the original gate/up when it is off), down quantized.
3. Return a QuantizedExperts module and its outputs on the recorded inputs, computed expert by expert
   (`expert_outputs`): the caller lets the layer read them (`PrecomputedExperts`) to produce the next
   layer's inputs, then swaps the QuantizedExperts in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch

from moequant.arch import ExpertWeights, MoEArch, MoEBlockRef, apply_activation
from moequant.calibration.capture import LayerInputs
from moequant.calibration.expert_io import ExpertInputs, collect_expert_inputs
from moequant.config import (
    CalibMode,
    Method,
    QuantizeConfig,
    QuantSpec,
    Spec,
    expert_spec,
    proj_specs,
    spec_label,
)
from moequant.errors import MoEQuantError
from moequant.kernels.reference import add_terms, routed_terms, token_groups
from moequant.modules.qexperts import QuantizedExperts
from moequant.modules.qlinear import dequantized_rows, project
from moequant.quantize.assign import assign_experts, expert_costs
from moequant.quantize.hessian import HessianAccumulator
from moequant.quantize.methods import HandlerOptions, needs_hessian, quantize_stack
from moequant.runtime.devices import free_bytes
from moequant.runtime.memory import release_free_memory
from moequant.runtime.ranks import Ranks, current

logger = logging.getLogger(__name__)


def _needs_hessian(spec: Spec) -> bool:
    return any(needs_hessian(p.method) for p in proj_specs(spec))


def _rtn_fallback(spec: Spec) -> Spec:
    """`spec` with every Hessian method replaced by identity-Hessian RTN at the same width and grid."""
    gu, dn = (
        QuantSpec(Method.RTN, p.bits, p.group_size, p.sym) if needs_hessian(p.method) else p
        for p in proj_specs(spec)
    )
    return expert_spec(gu, dn)


def _plan_methods(
    specs: list[Spec], tokens: torch.Tensor, config: QuantizeConfig
) -> tuple[list[Spec], list[str]]:
    """Specs actually used (Hessian methods fall back to RTN on too few routed tokens) and the reason."""
    used, notes = [], []
    for e, spec in enumerate(specs):
        if (
            _needs_hessian(spec)
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


def _take(t: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """t[ids] along dim 0: a view when the ids are a contiguous range (no copy of a [E, K, K] Hessian)."""
    if ids == list(range(ids[0], ids[-1] + 1)):
        return t[ids[0] : ids[-1] + 1]
    return t[torch.tensor(ids)]


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


def gate_up_hessians(part: list[int], H: int, batches, config: QuantizeConfig, device) -> torch.Tensor:
    """H [len(part), H, H] of the experts in `part` from the tokens routed to them (every token in ALL mode)."""
    try:
        acc = HessianAccumulator(len(part), H, all_experts=config.calib_mode is CalibMode.ALL, device=device)
        for x, idx, wts in batches:
            acc.add_routed(x, idx, wts if config.weight_by_routing else None, experts=part)
        return acc.finalize(inplace=True)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        _raise_oom(err, len(part), H, "gate/up")


def down_hessians(arch, w, part, gu_mods, batches, config, act_params) -> torch.Tensor:
    """H [len(part), I, I] from act(gate/up(x)) on each expert's tokens: the quantized gate/up when
    true_sequential, else the original. `w`: the chunk's weights (row j is expert part[j])."""
    try:
        acc = HessianAccumulator(len(part), w.intermediate, device=w.down.device)
        for j, e in enumerate(part):
            W1 = gu_mods[e] if config.true_sequential else w.gate_up[j]  # storage module, or [2I, H] tensor
            sel = []  # the token sets of the batches that reach e
            for x, idx, wts in batches:
                if config.calib_mode is CalibMode.ALL:
                    sel.append(_TokenSet(x, None, None))
                    continue
                rows, pos = torch.where(idx == e)
                if rows.numel():
                    sel.append(_TokenSet(x, rows, wts[rows, pos] if config.weight_by_routing else None))
            for group in token_groups([t.size for t in sel], _row_elems(w.hidden, w.intermediate)):
                xs = [sel[g].take() for g in group]  # [Te, H] float32 each
                _add_down_inputs(acc, j, arch, W1, w, xs, [sel[g].weights for g in group], act_params)
                del xs
        return acc.finalize(inplace=True)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        _raise_oom(err, len(part), w.intermediate, "down-projection")


class _TokenSet(NamedTuple):
    """The tokens of one recorded batch that reach an expert: x [T, H], their rows (None: all) and their
    routing weights [Te] (None: unweighted)."""

    x: torch.Tensor
    rows: torch.Tensor | None
    weights: torch.Tensor | None

    @property
    def size(self) -> int:
        return self.x.shape[0] if self.rows is None else self.rows.numel()

    def take(self) -> torch.Tensor:
        return (self.x if self.rows is None else self.x[self.rows]).float()  # [Te, H]


def _row_elems(hidden: int, intermediate: int) -> int:
    """float32 values per token that token_groups budgets: its input [H] and its gate/up output [2I]."""
    return 2 * intermediate + hidden


def _add_down_inputs(acc, j: int, arch, W1, w: ExpertWeights, xs, rws, act_params) -> None:
    """Add act(gate/up(x)) of each x [Te, H] float32 in xs (routing weights rws) to expert row j of acc;
    W1 (storage module or [2I, H] tensor) is dequantized once for all of xs, a row slice at a time."""
    for h, rw in zip(project(W1, xs), rws, strict=True):  # [Te, 2I] each
        if w.gate_up_bias is not None:
            h = h + w.gate_up_bias[j].float()
        acc.add(j, apply_activation(arch.activation, h, act_params), rw)  # [Te, I]
        del h


def _raise_oom(err: BaseException, n: int, dim: int, what: str):
    if isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError):
        if "memory" not in str(err).lower():
            raise err
    gb = n * dim * dim * 4 / 1e9
    raise MoEQuantError(
        f"out of memory accumulating {what} Hessians ({n} experts x {dim}^2 float32 = {gb:.1f} GB "
        "plus activations); lower --gptq-chunk-mb, --samples or --seq-len, pass --offload-activations, "
        "or free memory"
    ) from None


_DEVICE_SHARE = 0.5  # of an accelerator's free memory, what one chunk of experts may plan for


def chunk_bytes(config: QuantizeConfig, device: torch.device) -> int:
    """Working memory one chunk of experts may take: config.gptq_chunk_mb, capped on an accelerator at half
    of its free memory (measured when the layer starts: the layer and activations are already there)."""
    budget = config.gptq_chunk_mb * 2**20
    free = free_bytes(device)
    if free is not None:
        budget = min(budget, int(free * _DEVICE_SHARE)) if budget else int(free * _DEVICE_SHARE)
    return budget


@torch.no_grad()
def expert_outputs(
    qe: QuantizedExperts, feats: ExpertInputs, owner: list[int] | None = None, ranks: Ranks | None = None
) -> list[torch.Tensor]:
    """What `qe` returns for each recorded batch: the routed sum (kernels/reference.routed_terms) computed
    expert by expert, so every expert is dequantized once per layer instead of once per batch; the outputs
    equal qe(x, idx, w) bit for bit.

    With several ranks (`owner`: the rank of each expert), each rank computes its own experts' terms, every
    rank receives all of them, and each adds them up in the same ascending order: the same bits as one rank."""
    device = feats.x[0].device if feats.x else torch.device("cpu")
    outs = [torch.zeros(x.shape[0], qe.hidden, dtype=torch.float32, device=device) for x in feats.x]  # [T, H]
    row = _row_elems(qe.hidden, qe.intermediate)
    if ranks is None or not ranks.distributed:
        terms = routed_terms(feats.x, feats.idx, feats.w, qe.expert_forward, range(qe.num_experts), row)
    else:
        mine = [e for e in range(qe.num_experts) if owner[e] == ranks.rank]
        with ranks.guard("computing its experts' outputs"):
            own = [
                (e, b, tok.cpu(), y.cpu())
                for e, b, tok, y in routed_terms(feats.x, feats.idx, feats.w, qe.expert_forward, mine, row)
            ]
        terms = sorted((t for got in ranks.all_gather(own) for t in got), key=lambda t: t[0])  # stable
    add_terms(outs, terms)
    return [o.to(feats.dtype).reshape(shape) for o, shape in zip(outs, feats.shapes, strict=True)]


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
) -> tuple[QuantizedExperts, list[dict], list[torch.Tensor]]:
    """Quantize the block's experts chunk by chunk: a chunk's gate/up Hessians, its gate/up, its down
    Hessians (through the quantized gate/up), its down projections; only one chunk's Hessians exist at a
    time. Results do not depend on the chunking (batched GPTQ equals per-expert calls bit for bit).

    `read_experts(ids)` gives the fused expert weights of those experts ({parameter name: [len(ids), ...]},
    CheckpointSource.read_experts) when the block's own are not loaded (meta); else they are sliced from it.

    Returns the quantized module, the report rows, and the quantized experts' output for every calibration
    batch (what the layer needs to compute the next layer's inputs)."""
    w: ExpertWeights = arch.expert_weights(ref.experts)  # meta tensors (shapes only) when read lazily
    E, I, H = w.num_experts, w.intermediate, w.hidden
    if w.gate_up.device.type == "meta" and read_experts is None:
        raise ValueError("the block's expert weights are not loaded and no read_experts was given")
    act_params = arch.activation_params(ref.experts)
    feats = collect_expert_inputs(layer, ref, inputs)
    device = feats.x[0].device  # where the layer computed: Hessians, GPTQ and outputs run there too
    batches = list(zip(feats.x, feats.idx, feats.w, strict=True))
    routed = torch.zeros(E, dtype=torch.int64)
    for _, idx, _ in batches:
        routed += torch.bincount(idx.reshape(-1), minlength=E)[:E].cpu()
    used, notes = _plan_methods(specs, routed, config)
    ranks = current()
    hessian_of = [_needs_hessian(s) for s in used]
    owner = assign_experts(expert_costs(routed.tolist(), H, I, hessian_of), ranks.world)  # rank per expert
    mine = [e for e in range(E) if owner[e] == ranks.rank]
    options = HandlerOptions(config.gptq, storage_dtype, consume_hessian=True)  # Hessians freed after GPTQ
    # per expert: the fp32 weight copy plus the solver's three weight-sized buffers, and both Hessians
    per_expert = 2 * I * H * 4 * 4 + (H * H + I * I) * 4
    gu_mods: list = [None] * E
    dn_mods: list = [None] * E
    gu_diag: list = [None] * E
    dn_diag: list = [None] * E
    rel_err: list = [None] * E
    with ranks.guard(f"quantizing the experts of layer {ref.layer_idx}"):  # this rank's experts only
        for part in expert_chunks(used, per_expert, chunk_bytes(config, device), experts=mine):
            _quantize_chunk(arch, ref, w, part, used[part[0]], batches, config, options, act_params, read_experts,
                            gu_mods, dn_mods, gu_diag, dn_diag, rel_err)  # fmt: skip
    del batches
    if ranks.distributed:  # every rank gets every expert's result (the writer stores them all)
        gathered = ranks.all_gather(
            {
                e: (gu_mods[e].to("cpu"), dn_mods[e].to("cpu"), gu_diag[e], dn_diag[e], rel_err[e])
                for e in mine
            }
        )
        for got in gathered:
            for e, (gu, dn, gd, dd, err) in got.items():
                gu_mods[e], dn_mods[e], gu_diag[e], dn_diag[e], rel_err[e] = (
                    gu.to(device),
                    dn.to(device),
                    gd,
                    dd,
                    err,
                )

    qe = QuantizedExperts(
        used,
        H,
        I,
        arch.activation,
        act_params,
        has_bias=arch.has_bias,
        act_order=config.stores_g_idx,
        dtype=storage_dtype,
        device="meta",
    )
    for e in range(E):
        qe.set_expert(e, gu_mods[e], dn_mods[e], used[e])
    if arch.has_bias:
        qe.gate_up_bias = w.gate_up_bias.to(storage_dtype).clone()
        qe.down_bias = w.down_bias.to(storage_dtype).clone()
    report = []
    for e in range(E):
        row = {
            "layer": ref.layer_idx,
            "expert": e,
            "tokens": int(routed[e]),
            "planned": spec_label(specs[e]),
            **_used_fields(used[e]),
            "rel_weight_error": rel_err[e],
            "rank": owner[e],
        }
        if notes[e]:
            row["note"] = notes[e]
        for k, v in (gu_diag[e] or {}).items():
            row[f"gate_up_{k}"] = v
        for k, v in (dn_diag[e] or {}).items():
            row[f"down_{k}"] = v
        report.append(row)
    return qe, report, expert_outputs(qe, feats, owner, ranks)


def _quantize_chunk(arch, ref, w, part, spec, batches, config, options, act_params, read_experts,
                    gu_mods, dn_mods, gu_diag, dn_diag, rel_err) -> None:  # fmt: skip
    """One chunk of experts (same spec, per projection): its gate/up Hessians, its gate/up, its down Hessians (through the
    quantized gate/up), its down projections; results into the per-expert lists. Running out of memory says
    what to lower."""
    try:
        _quantize_chunk_in_memory(arch, ref, w, part, spec, batches, config, options, act_params, read_experts,
                                  gu_mods, dn_mods, gu_diag, dn_diag, rel_err)  # fmt: skip
    except (torch.OutOfMemoryError, MemoryError):
        raise MoEQuantError(
            f"out of memory quantizing experts {part[0]}..{part[-1]} of layer {ref.layer_idx} ({len(part)} at "
            f"once, chunk budget {config.gptq_chunk_mb} MB); lower --gptq-chunk-mb, pass --offload-activations, "
            "or lower --samples / --seq-len"
        ) from None


def _quantize_chunk_in_memory(arch, ref, w, part, spec, batches, config, options, act_params, read_experts,
                              gu_mods, dn_mods, gu_diag, dn_diag, rel_err) -> None:  # fmt: skip
    gu_spec, dn_spec = proj_specs(spec)
    wc = _chunk_weights(arch, ref.experts, w, part, read_experts)  # this chunk's experts only
    hessian = needs_hessian(gu_spec.method)
    h = gate_up_hessians(part, w.hidden, batches, config, wc.down.device) if hessian else None  # [Ec, H, H]
    mods, diags = quantize_stack(wc.gate_up, h, gu_spec, options)  # W [Ec, 2I, H], as stored
    del h
    for j, e in enumerate(part):
        gu_mods[e], gu_diag[e] = mods[j], diags[j]
    gu_err = [_err_sums(wc.gate_up[j], gu_mods[e]) for j, e in enumerate(part)]  # (num, den) each
    if config.true_sequential:  # the down Hessians read the quantized gate/up: drop the original now
        wc = replace(wc, gate_up=wc.gate_up.to("meta"))  # (its shape still gives the hidden size)
    hessian = needs_hessian(dn_spec.method)
    h = down_hessians(arch, wc, part, gu_mods, batches, config, act_params) if hessian else None
    mods, diags = quantize_stack(wc.down, h, dn_spec, options)  # W [Ec, H, I] as stored, h [Ec, I, I]
    del h
    for j, e in enumerate(part):
        dn_mods[e], dn_diag[e] = mods[j], diags[j]
        rel_err[e] = _rel_err(*_err_sums(wc.down[j], dn_mods[e], *gu_err[j]))
    del mods, diags, wc
    release_free_memory()  # the chunk's temporaries, before the next chunk allocates its own


def _used_fields(spec: Spec) -> dict:
    """The report's method and bits of an expert as quantized (and per projection where they differ)."""
    gu, dn = proj_specs(spec)
    out = {"method": gu.method.value, "bits": gu.bits}
    if gu != dn:
        out |= {"down_method": dn.method.value, "down_bits": dn.bits}
    return out


def _chunk_weights(arch: MoEArch, experts, w: ExpertWeights, part: list[int], read_experts) -> ExpertWeights:
    """Canonical weights of the experts in `part` ([len(part), ...] each): slices of the loaded block `w`,
    or, when its weights are not loaded, what `read_experts(part)` reads (in the module's layout)."""
    if read_experts is None:
        gub = None if w.gate_up_bias is None else _take(w.gate_up_bias, part)  # [Ec, 2I]
        db = None if w.down_bias is None else _take(w.down_bias, part)  # [Ec, H]
        return ExpertWeights(_take(w.gate_up, part), _take(w.down, part), gub, db)
    fused = read_experts(part)
    for name in ("gate_up_proj_bias", "down_proj_bias") if arch.has_bias else ():
        fused[name] = _take(getattr(experts, name), part)  # biases load with the layer (small)
    return arch.canonical_from_fused(fused)


def _err_sums(W: torch.Tensor, q, num=0.0, den=0.0):
    """(num + ||W - Q||^2, den + ||W||^2) for W [N, K] and its quantized storage q, one float32 row slice
    at a time (no float32 copy of the whole matrix)."""
    for r1, r2, d in dequantized_rows(q, torch.float32):  # d [r, K]
        Wr = W[r1:r2].to(torch.float32)  # [r, K] (may be W itself or d's own storage: never written)
        num = num + (d - Wr).pow_(2).sum()  # ||Q - W||^2
        den = den + Wr.pow(2).sum()
        del d, Wr
    return num, den


def _rel_err(num, den) -> float:
    """sqrt(num / den): an expert's relative weight error over both projections (see _err_sums)."""
    return round(float((num / den.clamp(min=1e-30)).sqrt()), 6)
