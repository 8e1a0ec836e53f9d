"""The Hessians of a chunk of experts from the calibration tokens routed to them.

gate/up: H = sum over an expert's tokens of (w x)(w x)^T, x [H] its input (w its routing weight when
`weight_by_routing`); down: the same of act(gate/up(x)) [I], through the quantized gate/up when
`true_sequential`, else the original. Running out of memory says what to lower.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moequant.arch import ExpertWeights, apply_activation
from moequant.calibration.stats import routed_slots
from moequant.config import CalibMode, QuantizeConfig
from moequant.errors import MoEQuantError
from moequant.kernels.reference import token_groups
from moequant.modules.qlinear import project
from moequant.quantize.chunks import row_elems
from moequant.quantize.hessian import HessianAccumulator


def gate_up_hessians(part: list[int], H: int, batches, config: QuantizeConfig, device) -> torch.Tensor:
    """H [len(part), H, H] of the experts in `part` from the tokens routed to them (every token in ALL mode)."""
    try:
        acc = HessianAccumulator(len(part), H, all_experts=config.calib_mode is CalibMode.ALL, device=device)
        for x, idx, wts in batches:  # unweighted: 1 for each routed slot, 0 for one that routes nowhere
            weights = wts if config.weight_by_routing else routed_slots(wts).to(wts.dtype)  # [T, k]
            acc.add_routed(x, idx, weights, experts=part)
        return acc.finalize(inplace=True)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        _raise_oom(err, len(part), H, "gate/up")


def down_hessians(arch, w, part, gu_mods, batches, config, act_params, keep=None) -> torch.Tensor:
    """H [len(part), I, I] from act(gate/up(x)) on each expert's tokens: the quantized gate/up (gu_mods[e])
    when true_sequential, else the original. `w`: the chunk's weights (row j is expert part[j]).

    keep: receives the down inputs act(gate/up(x)) [Te, I] float32 of each expert's token sets, batch by
    batch, for the batches it keeps (what the layer's outputs read again: expert_outputs.DownInputs)."""
    try:
        acc = HessianAccumulator(len(part), w.intermediate, device=w.down.device)
        for j, e in enumerate(part):
            W1 = gu_mods[e] if config.true_sequential else w.gate_up[j]  # storage module, or [2I, H] tensor
            sel = token_sets(e, batches, config)
            for group in token_groups([t.size for t in sel], row_elems(w.hidden, w.in_rows)):
                xs = [sel[g].take() for g in group]  # [Te, H] float32 each
                acts = _add_down_inputs(acc, j, arch, W1, w, xs, [sel[g].weights for g in group], act_params)
                if keep is not None:
                    for g, a in zip(group, acts, strict=True):
                        keep.add(e, sel[g].batch, a)
                del xs, acts
        return acc.finalize(inplace=True)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        _raise_oom(err, len(part), w.intermediate, "down-projection")


class _TokenSet(NamedTuple):
    """The tokens of recorded batch `batch` that reach an expert: x [T, H], their rows (None: all) and their
    routing weights [Te] (None: unweighted)."""

    x: torch.Tensor
    rows: torch.Tensor | None
    weights: torch.Tensor | None
    batch: int

    @property
    def size(self) -> int:
        return self.x.shape[0] if self.rows is None else self.rows.numel()

    def take(self) -> torch.Tensor:
        return (self.x if self.rows is None else self.x[self.rows]).float()  # [Te, H]


def token_sets(e: int, batches, config: QuantizeConfig) -> list[_TokenSet]:
    """The token sets of the batches that reach expert e (every batch whole in ALL mode)."""
    sel = []
    for b, (x, idx, wts) in enumerate(batches):
        if config.calib_mode is CalibMode.ALL:
            sel.append(_TokenSet(x, None, None, b))
            continue
        rows, pos = torch.where((idx == e) & routed_slots(wts))
        if rows.numel():
            sel.append(_TokenSet(x, rows, wts[rows, pos] if config.weight_by_routing else None, b))
    return sel


def _add_down_inputs(acc, j: int, arch, W1, w: ExpertWeights, xs, rws, act_params) -> list[torch.Tensor]:
    """Add act(gate/up(x)) of each x [Te, H] float32 in xs (routing weights rws) to expert row j of acc, and
    return them; W1 (storage module or [2I, H] tensor) is dequantized once for all of xs, a row slice at a
    time. The arithmetic is QuantizedExperts.expert_hidden's."""
    acts = []
    for h, rw in zip(project(W1, xs), rws, strict=True):  # [Te, 2I] each
        if w.gate_up_bias is not None:
            h = h + w.gate_up_bias[j].float()
        acts.append(apply_activation(arch.activation, h, act_params))  # [Te, I]
        acc.add(j, acts[-1], rw)
        del h
    return acts


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
