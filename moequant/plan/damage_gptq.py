"""The damage table from what GPTQ actually leaves (`--damage gptq`), instead of the RTN / diagonal proxy.

The plan stage owns it; what it runs of the quantize stage (the Hessians, GPTQ as the quantize pass runs it)
is handed in as a GPTQPricing (quantize/pricing.gptq_pricing builds it; the API and the sweep pass it down),
since the plan stage sits below the quantize stage and does not import it.

For every expert projection W (gate/up, down) and every candidate spec c (config.columns()):

    damage(e, p, c) = importance(e) * L_c(W_ep),     L_c(W) = tr((W - Q_c) H (W - Q_c)^T) / 2

with H = 2 X X^T / n the projection's Hessian over the tokens routed to expert e (the quantize pass's own
Hessian, quantize/hessian.py: routing-weighted, normalised by the routed mass), Q_c the GPTQ result at c and
L_c the loss GPTQ reports for it (quantizers/gptq.py accumulates it column by column, on its damped Hessian
H + damp I: about 1% above the undamped loss). L_c is a mean over the
expert's tokens of ||(W - Q_c) x||^2, so importance(e) (the routed share per token, importance.py) converts it
to a per-token cost of the model, as in the proxy (damage.py). The down projection's Hessian reads the original
gate/up (the quantize pass reads the quantized one: "true sequential"); candidates that are not a Hessian method
(RTN, keep) are priced with H too: tr((W - Q) H (W - Q)^T) / 2.

Engineering: one sequential pass over the layers (calibration/stream.py), the layer's experts in memory, the
experts' Hessians a chunk at a time; GPTQ runs once per candidate width per chunk (batched over the chunk's
experts). That is |columns| times the quantize pass's GPTQ work: affordable on small and mid-size models,
and what makes the table agree with the quantizer (bench: `python -m moequant.evals.bench.damage_check`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moequant.arch import ExpertWeights, block_ref
from moequant.calibration.data import CalibData
from moequant.calibration.expert_io import collect_expert_inputs
from moequant.calibration.profiler import Profile
from moequant.calibration.stream import LayerStep, first_inputs, stream_layers
from moequant.checkpoint.source import Source, expert_dims, non_expert_nbytes
from moequant.config import Method, QuantSpec
from moequant.plan.config import PlanConfig
from moequant.plan.damage import DamageTable, linear_items
from moequant.plan.importance import importance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQPricing:
    """What `--damage gptq` runs of the quantize stage, bound to that stage's GPTQ options."""

    gate_up_hessians: Callable  # (part, hidden, batches, device) -> H [Ec, H, H] from the routed tokens
    down_hessians: Callable  # (arch, weights, part, batches, act_params) -> H [Ec, I, I], original gate/up
    quantize: Callable  # (W [E, N, K], H [E, K, K] | None, spec) -> (storage modules, diagnostics)
    needs_hessian: Callable[[Method], bool]
    learns_experts: Callable[[Method], bool] = lambda method: False
    # (arch, w, part, spec, (gate/up mods, down mods), batches, act_params) -> the pair a method that learns its
    # experts (signround) stores after its handler's result, both projections at `spec`
    learn: Callable | None = None


def hessian_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W - Q) H (W - Q)^T) / 2 per expert: W, Q [E, N, K], H [E, K, K] -> [E] float64."""
    D = W.float() - Q.float()  # [E, N, K]
    return ((D @ H.float()) * D).sum(dim=(1, 2)).double() / 2


def _losses(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, pricing: GPTQPricing) -> torch.Tensor:
    """[E] the loss each expert's projection W [E, N, K] keeps after quantizing at `spec` on Hessian H."""
    if spec.method is Method.KEEP:
        return torch.zeros(W.shape[0], dtype=torch.float64)
    mods, diags = pricing.quantize(W, H.clone() if pricing.needs_hessian(spec.method) else None, spec)
    if pricing.needs_hessian(spec.method) and all("gptq_loss" in d for d in diags):
        return torch.tensor([d["gptq_loss"] for d in diags], dtype=torch.float64)
    Q = torch.stack([m.dequantize(torch.float32) for m in mods])  # [E, N, K]
    return hessian_loss(W, Q, H)


def _learned_losses(
    arch, w: ExpertWeights, part, hessians, spec, batches, act_params, pricing
) -> torch.Tensor:
    """[Ec, 2] the loss each projection keeps after a method that learns its experts (signround): its handler's
    result for both projections at `spec`, learned together on the routed tokens (the layer's drift is zero in
    the unquantized model this pass streams), priced like every other candidate by tr((W - Q) H (W - Q)^T) / 2."""
    h_gu, h_dn = hessians
    gu, _ = pricing.quantize(w.gate_up, h_gu.clone(), spec)
    dn, _ = pricing.quantize(w.down, h_dn.clone(), spec)
    gu, dn = pricing.learn(arch, w, part, spec, (gu, dn), batches, act_params)
    out = []
    for W, mods, H in ((w.gate_up, gu, h_gu), (w.down, dn, h_dn)):
        Q = torch.stack([m.dequantize(torch.float32) for m in mods])  # [Ec, N, K]
        out.append(hessian_loss(W, Q, H))
    return torch.stack(out, dim=1)  # [Ec, 2]


def damage_from_gptq(
    source: Source,
    profile: Profile,
    config: PlanConfig,
    data: CalibData,
    pricing: GPTQPricing,
    batch_size: int = 8,
    chunk_mb: float = 256,
) -> DamageTable:
    """The damage table of the model behind `source` (a source that loads whole layers) priced by GPTQ's loss
    on the real Hessians of `data` (see the module docstring). Same shape and columns as damage.py's table."""
    arch = source.arch
    keys: list[tuple[int, int]] = []
    tables: list[np.ndarray] = []  # [E, 2, c] per MoE layer
    for step in stream_layers(
        source, first_inputs(source, data, batch_size), "damage (GPTQ)", config.progress
    ):
        ref = block_ref(arch, step.index, step.layer)
        if ref is not None:
            keys.extend((step.index, e) for e in range(ref.num_experts))
            tables.append(_layer_table(arch, ref, step, profile, config, pricing, chunk_mb))
    hidden, inter = expert_dims(source)
    return DamageTable(
        arch.model_type, keys, np.concatenate(tables), config, hidden, inter, non_expert_nbytes(source),
        linear_items=tuple(linear_items(source)) if config.non_expert_auto else (),
        gated=arch.activation.gated,
    )  # fmt: skip


def _layer_table(arch, ref, step: LayerStep, profile: Profile, config: PlanConfig, pricing: GPTQPricing,
                 chunk_mb: float) -> np.ndarray:  # fmt: skip
    """damage [E, 2, c] of one layer's experts: importance x GPTQ's loss per projection and candidate, the
    experts' Hessians a chunk at a time."""
    columns = config.columns()
    w: ExpertWeights = arch.expert_weights(ref.experts)
    E, H, inter = w.num_experts, w.hidden, w.intermediate
    feats = collect_expert_inputs(step.layer, ref, step.inputs)
    batches = list(zip(feats.x, feats.idx, feats.w, strict=True))
    act_params = arch.activation_params(ref.experts)
    imp = importance(profile, step.index, config)  # [E]
    per_expert = 4 * (w.in_rows * H + H * inter + H * H + inter * inter)  # float32 weights and both Hessians
    size = max(1, int(chunk_mb * 2**20 // per_expert))
    rows = torch.zeros(E, 2, len(columns), dtype=torch.float64)  # [E, 2, c]
    for c0 in range(0, E, size):
        part = list(range(c0, min(c0 + size, E)))
        wc = ExpertWeights(
            w.gate_up[part].float(),  # [Ec, 2I, H] ([Ec, I, H] non-gated)
            w.down[part].float(),  # [Ec, H, I]
            None if w.gate_up_bias is None else w.gate_up_bias[part],
            None if w.down_bias is None else w.down_bias[part],
        )
        h_gu = pricing.gate_up_hessians(part, H, batches, wc.gate_up.device)  # [Ec, H, H]
        h_dn = pricing.down_hessians(arch, wc, part, batches, act_params)  # [Ec, I, I]
        for c, spec in enumerate(columns):
            if pricing.learns_experts(spec.method):
                rows[part, :, c] = _learned_losses(
                    arch, wc, part, (h_gu, h_dn), spec, batches, act_params, pricing
                )
                continue
            rows[part, 0, c] = _losses(wc.gate_up, h_gu, spec, pricing)
            rows[part, 1, c] = _losses(wc.down, h_dn, spec, pricing)
        del h_gu, h_dn, wc
    logger.debug("GPTQ damage: layer %d done", step.index)
    return (imp[:, None, None] * rows).numpy()  # [E, 2, c]
