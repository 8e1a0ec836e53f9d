"""What the plan stage's `--damage gptq` runs of this stage (plan/damage_gptq.GPTQPricing): the Hessians, GPTQ
and the learning of a method that learns its experts (signround) as the quantize pass runs them, bound to one
quantize config's options."""

from __future__ import annotations

from dataclasses import replace

import torch

from moequant.config import QuantizeConfig
from moequant.plan.damage_gptq import GPTQPricing
from moequant.quantize.expert_hessians import down_hessians, gate_up_hessians
from moequant.quantize.methods import HandlerOptions, learns_experts, needs_hessian, quantize_stack
from moequant.quantize.signround import signround_chunk


def gptq_pricing(config: QuantizeConfig = QuantizeConfig()) -> GPTQPricing:
    """The pricing of `config` (default: the quantize command's defaults). The down projections' Hessians read
    the original gate/up: the table prices each projection alone, before any other is quantized."""
    qcfg = replace(config, true_sequential=False, progress=False)
    options = HandlerOptions(qcfg.gptq, torch.bfloat16)

    def gu_hessians(part, hidden, batches, device):
        return gate_up_hessians(part, hidden, batches, qcfg, device)  # [Ec, H, H]

    def dn_hessians(arch, w, part, batches, act_params):
        return down_hessians(arch, w, part, None, batches, qcfg, act_params)  # [Ec, I, I], original gate/up

    def learn(arch, w, part, spec, stored, batches, act_params):
        drift = [torch.zeros_like(x, dtype=torch.float32) for x, _, _ in batches]  # the unquantized stream's
        gu, dn, _ = signround_chunk(
            arch, w, part, (spec, spec), stored, (True, True), batches, qcfg, act_params, seed=0, drift=drift
        )
        return gu, dn

    return GPTQPricing(
        gate_up_hessians=gu_hessians,
        down_hessians=dn_hessians,
        quantize=lambda W, H, spec: quantize_stack(W, H, spec, options),
        needs_hessian=needs_hessian,
        learns_experts=learns_experts,
        learn=learn,
    )
