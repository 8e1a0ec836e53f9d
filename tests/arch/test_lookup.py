"""The adapter of a model and its MoE blocks: every expert found in every family, and clear errors for a family
outside the interface, a dense model and a MoE family whose layers are all dense."""

import pytest
from helpers import ARCH_FAMILIES as FAMILIES
from helpers import noise_router, tiny_llama

from moequant.arch import moe_blocks, resolve
from moequant.arch.tiny import tiny_model
from moequant.errors import NoMoEError, UnsupportedModelError


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


def test_router_without_logits_is_a_clear_error(monkeypatch):
    """A router that hands the experts their weights with no logits that give them (here its logits replaced by
    noise over one class more than the experts): said, not guessed."""
    noise_router(monkeypatch)
    with pytest.raises(UnsupportedModelError, match="router logits"):
        resolve(tiny_model("mixtral"))


def test_dense_model_is_a_clear_error():
    with pytest.raises(NoMoEError, match="no Mixture-of-Experts"):
        resolve(tiny_llama(vocab_size=64))


def test_moe_family_with_only_dense_layers_is_no_moe():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(NoMoEError):
        moe_blocks(model)
