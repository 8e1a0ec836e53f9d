"""Derived adapters: every expert found, the canonical view reproduces the model's own experts, the router
facts reproduce what the model routes. The six families moequant once wrote adapters for, plus families that
exercise the other layouts and activations (Aria: transposed, concatenated; Gemma 4: experts directly in the
decoder layer and its own gate function; MiniMax-M3: GPT-OSS SwiGLU on concatenated experts; Jamba)."""

import pytest
import torch

from moequant.arch import (
    Activation,
    ExpertLayout,
    expert_forward,
    get_arch,
    moe_blocks,
    resolve,
    supported_model_types,
)
from moequant.arch.tiny import tiny_model
from moequant.errors import NoMoEError, UnsupportedModelError

FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
    "aria_text", "gemma4", "minimax_m3_vl_text", "jamba", "qwen3_5_moe",
]  # fmt: skip


def test_families_of_this_transformers():
    types = supported_model_types()
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_5_moe"} <= set(
        types
    )
    assert len(types) >= 40  # read from the installed modeling code, not a list of ours


def test_derived_facts_of_known_families():
    """What the derivation measured, against what each family's modeling code does."""
    mixtral, gpt_oss, ds3 = get_arch("mixtral"), get_arch("gpt_oss"), get_arch("deepseek_v3")
    assert (mixtral.layout, mixtral.activation, mixtral.router) == (
        ExpertLayout.GATE_UP_CONCAT,
        Activation.SILU_GLU,
        "gate",
    )
    assert mixtral.router_facts.scoring == "softmax" and mixtral.router_facts.renormalized
    assert (gpt_oss.layout, gpt_oss.activation, gpt_oss.router, gpt_oss.has_bias) == (
        ExpertLayout.TRANSPOSED_INTERLEAVED,
        Activation.GPT_OSS_SWIGLU,
        "router",
        True,
    )
    assert ds3.router_facts.scoring == "sigmoid" and ds3.router_facts.renormalized
    assert ds3.router_facts.scale == pytest.approx(2.5)  # routed_scaling_factor of the default config
    assert ds3.shared == ("shared_experts",)
    assert get_arch("aria_text").layout is ExpertLayout.TRANSPOSED_CONCAT
    gemma = get_arch("gemma4")
    assert (gemma.block, gemma.activation) == ("", Activation.MODULE)
    # qwen2_moe renormalises only with norm_topk_prob: the fact follows the config, not the family
    on = get_arch(tiny_model("qwen2_moe", norm_topk_prob=True).config).router_facts
    off = get_arch(tiny_model("qwen2_moe", norm_topk_prob=False).config).router_facts
    assert (on.renormalized, off.renormalized) == (True, False)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_expert_found(model_type):
    model = tiny_model(model_type)
    arch, blocks = resolve(model)
    experts = [n for n, m in model.named_modules() if type(m).__name__ == arch.experts_class]
    assert [f"{arch.layers}.{b.layer_idx}.{arch.experts_path}" for b in blocks] == experts
    for b in blocks:
        w = arch.expert_weights(b.experts)
        assert w.num_experts == b.num_experts == 8
        assert b.top_k == 2
        assert w.gate_up.shape == (8, 2 * w.intermediate, model.config.hidden_size)
        assert w.down.shape == (8, model.config.hidden_size, w.intermediate)


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


@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_facts_reproduce_the_routed_weights(model_type):
    """On fresh inputs of a model of the family (not the twin the facts came from), the routed weights the
    experts receive equal the derived scoring of the router's logits at the chosen experts."""
    from moequant.arch import experts_call_args
    from moequant.arch.derive import router_facts

    model = tiny_model(model_type, seed=3)
    arch, blocks = resolve(model)
    got = {}
    b = blocks[0]
    h1 = b.router.register_forward_hook(lambda _m, _a, out: got.setdefault("out", out))
    h2 = b.experts.register_forward_pre_hook(
        lambda _m, a, k: got.setdefault("call", experts_call_args(a, k)) and None, with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5)))
    finally:
        h1.remove(), h2.remove()
    _, idx, w = got["call"]
    out = got["out"]
    logits = next(t for t in (out if isinstance(out, tuple) else (out,)) if t.shape[-1] == 8).reshape(-1, 8)
    facts = router_facts(logits.float(), idx, w.float())
    assert facts == arch.router_facts
    if facts.scoring != "unknown":
        scores = logits.float().softmax(-1) if facts.scoring == "softmax" else logits.float().sigmoid()
        g = scores.gather(-1, idx)
        if facts.renormalized:
            g = g / g.sum(-1, keepdim=True)
        torch.testing.assert_close(w.float(), g * facts.scale, rtol=1e-4, atol=1e-6)


def test_family_outside_the_interface_is_a_clear_error():
    """Zaya's router hands the experts their weights without [tokens, experts] logits: said, not guessed."""
    with pytest.raises(UnsupportedModelError, match="router logits"):
        resolve(tiny_model("zaya"))


def test_dense_model_is_a_clear_error():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(NoMoEError, match="no Mixture-of-Experts"):
        resolve(AutoModelForCausalLM.from_config(cfg))


def test_moe_family_with_only_dense_layers_is_no_moe():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(NoMoEError):
        moe_blocks(model)
