"""The damage table from what GPTQ actually leaves (`--damage gptq`), instead of the RTN / diagonal proxy.

It lives in the quantize stage (it runs the quantizer's Hessians and GPTQ) and registers itself with the
planner (plan/damage.register_pricer), which sits below this stage and cannot import it.

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

import numpy as np
import torch

from moequant.arch import ExpertWeights, block_ref
from moequant.calibration.data import CalibData
from moequant.calibration.expert_io import collect_expert_inputs
from moequant.calibration.profiler import Profile
from moequant.calibration.stream import sequential_pass
from moequant.checkpoint.source import expert_dims, non_expert_nbytes
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.plan.config import DamageKind, PlanConfig
from moequant.plan.damage import DamageTable, linear_items, register_pricer
from moequant.plan.importance import importance
from moequant.quantize.experts import down_hessians, gate_up_hessians
from moequant.quantize.methods import HandlerOptions, needs_hessian, quantize_stack

logger = logging.getLogger(__name__)


def hessian_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W - Q) H (W - Q)^T) / 2 per expert: W, Q [E, N, K], H [E, K, K] -> [E] float64."""
    D = W.float() - Q.float()  # [E, N, K]
    return ((D @ H.float()) * D).sum(dim=(1, 2)).double() / 2


def _losses(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, options: HandlerOptions) -> torch.Tensor:
    """[E] the loss each expert's projection W [E, N, K] keeps after quantizing at `spec` on Hessian H."""
    if spec.method is Method.KEEP:
        return torch.zeros(W.shape[0], dtype=torch.float64)
    mods, diags = quantize_stack(W, H.clone() if needs_hessian(spec.method) else None, spec, options)
    if needs_hessian(spec.method) and all("gptq_loss" in d for d in diags):
        return torch.tensor([d["gptq_loss"] for d in diags], dtype=torch.float64)
    Q = torch.stack([m.dequantize(torch.float32) for m in mods])  # [E, N, K]
    return hessian_loss(W, Q, H)


def damage_from_gptq(
    source, profile: Profile, config: PlanConfig, data: CalibData, batch_size: int = 8, chunk_mb: float = 256
) -> DamageTable:
    """The damage table of the model behind `source` (a source that loads whole layers) priced by GPTQ's loss
    on the real Hessians of `data` (see the module docstring). Same shape and columns as damage.py's table."""
    arch = source.arch
    qcfg = QuantizeConfig(true_sequential=False, progress=False)
    options = HandlerOptions.of(
        qcfg, torch.bfloat16
    )  # GPTQ as the quantize pass runs it (act-order included)
    columns = config.columns()
    keys: list[tuple[int, int]] = []
    tables: list[np.ndarray] = []

    def on_layer(i: int, layer, inputs):
        ref = block_ref(arch, i, layer)
        if ref is None:
            return None
        w: ExpertWeights = arch.expert_weights(ref.experts)
        E, H, inter = w.num_experts, w.hidden, w.intermediate
        feats = collect_expert_inputs(layer, ref, inputs)
        batches = list(zip(feats.x, feats.idx, feats.w, strict=True))
        act_params = arch.activation_params(ref.experts)
        imp = importance(profile, i, config)  # [E]
        per_expert = 4 * (3 * H * inter + H * H + inter * inter)  # float32 weights and both Hessians
        size = max(1, int(chunk_mb * 2**20 // per_expert))
        rows = torch.zeros(E, 2, len(columns), dtype=torch.float64)  # [E, 2, c]
        for c0 in range(0, E, size):
            part = list(range(c0, min(c0 + size, E)))
            wc = ExpertWeights(
                w.gate_up[part].float(),  # [Ec, 2I, H]
                w.down[part].float(),  # [Ec, H, I]
                None if w.gate_up_bias is None else w.gate_up_bias[part],
                None if w.down_bias is None else w.down_bias[part],
            )
            h_gu = gate_up_hessians(part, H, batches, qcfg, wc.gate_up.device)  # [Ec, H, H]
            h_dn = down_hessians(arch, wc, part, [None] * E, batches, qcfg, act_params)  # [Ec, I, I]
            for c, spec in enumerate(columns):
                rows[part, 0, c] = _losses(wc.gate_up, h_gu, spec, options)
                rows[part, 1, c] = _losses(wc.down, h_dn, spec, options)
            del h_gu, h_dn, wc
        keys.extend((i, e) for e in range(E))
        tables.append((imp[:, None, None] * rows).numpy())
        logger.debug("GPTQ damage: layer %d done", i)
        return None

    sequential_pass(source, data, batch_size, on_layer, "damage (GPTQ)", config.progress)
    hidden, inter = expert_dims(source)
    return DamageTable(
        arch.model_type, keys, np.concatenate(tables), config, hidden, inter, non_expert_nbytes(source),
        linear_items=tuple(linear_items(source)) if config.non_expert_auto else (),
    )  # fmt: skip


register_pricer(DamageKind.GPTQ, damage_from_gptq)
