"""Ergo (arch/ergo.py): its MoE blocks, conformed to call their non-gated expert projections through the
interface and apply each expert's own RMSNorm and the routing weights themselves, compute what transformers'
own blocks compute; the adapter; and a checkpoint quantized at 8 bits keeps each expert's norm under its
published name (loaded back by from_pretrained: the quantized model's logits depend on it)."""

import copy

import pytest
import torch

from moequant.arch import Activation, ExpertLayout, resolve
from moequant.arch.ergo import conform


def _original(k: int = 2, seed: int = 0):
    """A tiny Ergo as transformers builds it (not yet conformed), with per-expert norms and residual gates far
    from their initial ones and zeros (so a lost norm shows in the logits)."""
    from moequant.arch.tiny import tiny_model

    model = tiny_model("ergo", seed=seed, num_experts_per_tok=k).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_expert_norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # [E, H] per-expert scales in [0.5, 1.5)
            elif "residual_gate" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("k", [1, 2])
def test_conformed_blocks_compute_what_transformers_does(k):
    model = _original(k)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    mine = copy.deepcopy(model)
    keys = list(mine.state_dict())
    conform(mine)
    conform(mine)  # idempotent
    assert type(mine.model.layers[1].mlp).__name__ == "ErgoInterfaceMoe"
    assert type(mine.model.layers[1].mlp.experts).__name__ == "ErgoInterfaceExperts"
    assert list(mine.state_dict()) == keys  # parameters and their names unchanged
    with torch.no_grad():
        got = mine(input_ids=ids).logits
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_adapter_of_the_conformed_model():
    model = _original(2)
    arch, blocks = resolve(model)
    assert (arch.layers, arch.block, arch.router, arch.experts) == ("model.layers", "mlp", "gate", "experts")
    assert arch.activation is Activation.RELU2 and arch.layout is ExpertLayout.TRANSPOSED_CONCAT
    assert arch.in_proj == "up_proj"
    assert [b.layer_idx for b in blocks] == [1, 2]  # layer 0 is dense
    assert arch.router_facts.top_k == 2 and arch.router_facts.scoring == "sigmoid"
    assert abs(arch.router_facts.scale - model.config.moe_routed_scaling_factor) < 1e-6
    experts = blocks[0].experts
    assert set(arch.carried_modules(experts)) == {"post_expert_norm"}  # kept by a replacement
    E, H, I = experts.up_proj.shape
    w = arch.expert_weights(experts)
    assert w.gate_up.shape == (E, I, H) and torch.equal(w.gate_up, experts.up_proj.data.transpose(1, 2))
    assert w.down.shape == (E, H, I)


def test_quantized_checkpoint_keeps_each_experts_norm(tmp_path):
    from helpers import random_calib
    from transformers import AutoModelForCausalLM

    from moequant import api
    from moequant.checkpoint.format import read_headers
    from moequant.config import Method, QuantizeConfig, QuantSpec

    model = _original(2)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "post_expert_norm" in n}
    assert len(norms) == 2
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 8, 32))
    api.quantize(model, plan, random_calib(n=8), tmp_path / "q", QuantizeConfig(progress=False, min_tokens=0))
    headers = read_headers([str(p) for p in (tmp_path / "q").glob("*.safetensors")])
    assert set(norms) <= set(headers)  # under the published names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    state = loaded.state_dict()
    for name, value in norms.items():
        assert torch.equal(state[name], value)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        err = float((got - ref).norm() / ref.norm())
        for name in norms:  # the same quantized model with its experts' norms at their initial ones
            loaded.get_parameter(name).fill_(1.0)
        unnormed = float((loaded(input_ids=ids).logits - ref).norm() / ref.norm())
    assert err < 0.02  # the 8-bit bound
    assert unnormed > 5 * err  # the norm is in the logits: losing it would fail the bound above
