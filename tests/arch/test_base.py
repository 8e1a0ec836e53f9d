"""Derived adapters, the canonical view: for every family of helpers.ARCH_FAMILIES, the canonical expert weights
reproduce the model's own experts, and convert back to the fused tensors exactly."""

import pytest
import torch
from helpers import ARCH_FAMILIES as FAMILIES

from moequant.arch import expert_forward, get_arch, moe_blocks
from moequant.arch.tiny import tiny_model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_canonical_view_reproduces_each_expert(model_type):
    model = tiny_model(model_type, seed=1)
    arch = get_arch(model)
    torch.manual_seed(0)
    for b in moe_blocks(model, arch):
        w = arch.expert_weights(b.experts)
        params = arch.activation_params(b.experts)
        x = torch.randn(5, model.config.hidden_size)
        for e in range(w.num_experts):
            idx = torch.full((5, 1), e, dtype=torch.long)
            ones = torch.ones(5, 1)
            with torch.no_grad():
                ref = b.experts(x, idx, ones)  # the model's own experts module, all tokens on e
            ours = expert_forward(w, e, x, arch.activation, params)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_canonical_round_trip(model_type):
    model = tiny_model(model_type, seed=2)
    arch = get_arch(model)
    b = moe_blocks(model, arch)[0]
    fused = arch.fused_from_canonical(arch.expert_weights(b.experts))
    for name, t in fused.items():
        assert torch.equal(t, getattr(b.experts, name).data), name
