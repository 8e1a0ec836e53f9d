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


def _router_and_experts_calls(model, block) -> dict:
    """{"out": the router's output, "call": (hidden, top_k_index, top_k_weights) the experts receive} of block's
    first call on a fresh batch."""
    from moequant.arch import experts_call_args

    got = {}
    h1 = block.router.register_forward_hook(lambda _m, _a, out: got.setdefault("out", out))
    h2 = block.experts.register_forward_pre_hook(
        lambda _m, a, k: got.setdefault("call", experts_call_args(a, k)) and None, with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5)))
    finally:
        h1.remove(), h2.remove()
    return got


@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_facts_reproduce_the_routed_weights(model_type):
    """On fresh inputs of a model of the family (not the twin the facts came from), the routed weights the
    experts receive equal the derived scoring of the router's logits at the chosen experts."""
    from moequant.arch.derive import router_facts

    model = tiny_model(model_type, seed=3)
    arch, blocks = resolve(model)
    got = _router_and_experts_calls(model, blocks[0])
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


@pytest.mark.parametrize(
    ("model_type", "extra", "scale"),
    [("zaya", 1, 1.0), ("longcat_flash", 4, 6.0)],  # Zaya's skip expert; LongCat's zero experts, x6
)
def test_router_with_classes_that_route_nowhere(model_type, extra, scale):
    """Routers whose logits cover the experts and classes without an expert: the derivation finds the logits
    ([T, E + extra]) and a scoring over all classes that gives every routed slot its weight; a slot that chose
    an extra class reaches the experts with weight 0 (its index masked to some expert's)."""

    model = tiny_model(model_type, seed=3)
    arch, blocks = resolve(model)
    f = arch.router_facts
    assert (f.scoring, f.renormalized, f.extra_classes) == ("softmax", False, extra)
    assert f.scale == pytest.approx(scale)
    got = _router_and_experts_calls(model, blocks[0])
    _, idx, w = got["call"]
    logits = arch.router_logits(got["out"]).float()  # [T, E + extra]
    assert logits.shape == (idx.shape[0], 8 + extra)
    chosen = logits.softmax(-1) * scale  # [T, C]
    routed = w != 0
    torch.testing.assert_close(w[routed].float(), chosen.gather(-1, idx)[routed], rtol=1e-4, atol=1e-6)
    if model_type == "longcat_flash":  # the router's own choice: a class >= 8 exactly where the weight is 0
        assert torch.equal(got["out"][2] >= 8, ~routed) and (~routed).any()


def test_router_facts_ignore_slots_that_route_nowhere():
    """Top-2 over 8 experts and 2 extra classes; a slot choosing an extra class is masked to expert 0 with
    weight 0. The facts come from the routed slots alone (compared at the masked slots, expert 0's score is not
    0, and no scoring would match); an output of [T, C > E] that is not logits is passed over."""
    from moequant.arch.derive import _router_and_logits, router_facts

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 2  # [T, E + 2]
    top = logits.softmax(-1).topk(2, dim=-1)
    extra = top.indices >= 8  # [T, 2]
    assert extra.any()
    idx = top.indices.masked_fill(extra, 0)  # [T, 2]
    w = (top.values * 2.5).masked_fill(extra, 0)  # [T, 2]
    facts = router_facts(logits, idx, w)
    assert (facts.scoring, facts.renormalized, facts.top_k) == ("softmax", False, 2)
    assert facts.scale == pytest.approx(2.5)
    state = torch.randn(64, 10, generator=g)  # a router state of the same size, first in the output
    name, got, facts = _router_and_logits([("gate", (state, logits, w, idx))], idx, w, 8)
    assert name == "gate" and torch.equal(got, logits)
    assert (facts.extra_classes, facts.logits_at, facts.scale) == (2, 1, pytest.approx(2.5))
