"""Derived adapters: the facts derived from each family's modeling code (layout, activation, router scoring)
match what the family does, and the router facts reproduce what the model routes on fresh inputs."""

import pytest
import torch
from helpers import ARCH_FAMILIES as FAMILIES

from moequant.arch import Activation, ExpertLayout, get_arch, resolve
from moequant.arch.tiny import tiny_model


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
