"""What `--damage gptq` runs of the quantize stage (moequant/quantize/pricing.py): the quantize config's GPTQ
options unchanged, and down Hessians through the original gate/up."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from moequant.arch import Activation, ExpertWeights
from moequant.config import GPTQOptions, Method, QuantizeConfig, QuantSpec
from moequant.quantize.expert_hessians import down_hessians, gate_up_hessians
from moequant.quantize.methods import HandlerOptions, quantize_stack
from moequant.quantize.pricing import gptq_pricing


def _batches():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])  # [T, k]
    return [(torch.randn(40, 16, generator=g), idx, torch.rand(40, 2, generator=g))]


def test_pricing_runs_gptq_with_the_configs_own_options():
    torch.manual_seed(1)
    W, X = torch.randn(2, 8, 64), torch.randn(2, 256, 64) * torch.linspace(0.1, 3, 64)
    H = 2 / 256 * X.transpose(1, 2) @ X  # [E, K, K]
    spec = QuantSpec(Method.GPTQ, 3, 16)
    results = {}
    for act_order in (True, False):
        gptq = GPTQOptions(act_order=act_order, static_groups=True, percdamp=0.05)
        got = gptq_pricing(QuantizeConfig(gptq=gptq)).quantize(W, H.clone(), spec)
        want = quantize_stack(W, H.clone(), spec, HandlerOptions(gptq, torch.bfloat16))
        assert got[1] == want[1]  # the same losses and damping: the options reached GPTQ unchanged
        results[act_order] = got[1][0]["gptq_loss"]
    assert results[True] != results[False]  # and act-order is one of them


def test_pricing_hessians_read_the_original_gate_up_even_when_quantize_is_true_sequential():
    torch.manual_seed(2)
    batches, part = _batches(), [1, 3]
    w = ExpertWeights(torch.randn(2, 24, 16), torch.randn(2, 16, 12))  # the chunk's experts 1 and 3
    arch = SimpleNamespace(activation=Activation.SILU_GLU)
    cfg = QuantizeConfig(true_sequential=True, weight_by_routing=True)
    pricing = gptq_pricing(cfg)
    plain = QuantizeConfig(true_sequential=False, weight_by_routing=True)
    assert torch.equal(
        pricing.gate_up_hessians(part, 16, batches, "cpu"), gate_up_hessians(part, 16, batches, plain, "cpu")
    )
    want = down_hessians(arch, w, part, None, batches, plain, {})
    assert torch.equal(pricing.down_hessians(arch, w, part, batches, {}), want)
