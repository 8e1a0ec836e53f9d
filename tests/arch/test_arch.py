"""Architecture adapters: every expert found, the canonical view reproduces the model's own experts."""

import pytest
import torch

from moequant.arch import expert_forward, get_arch, moe_blocks, resolve, supported_model_types
from moequant.arch.tiny import tiny_model
from moequant.errors import NoMoEError, UnsupportedModelError

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def test_all_six_families_registered():
    assert set(FAMILIES) <= set(supported_model_types())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_expert_found(model_type):
    model = tiny_model(model_type)
    arch, blocks = resolve(model)
    n_layers = model.config.num_hidden_layers
    dense = getattr(model.config, "first_k_dense_replace", 0)
    assert [b.layer_idx for b in blocks] == list(range(dense, n_layers))
    for b in blocks:
        w = arch.expert_weights(b.experts)
        assert w.num_experts == b.num_experts == 8
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


def test_unsupported_family_names_supported_ones():
    from transformers import AutoModelForCausalLM, JambaConfig

    cfg = JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, expert_layer_period=1, expert_layer_offset=0,
        attn_layer_period=1, attn_layer_offset=0, mamba_d_state=4, mamba_d_conv=2, mamba_expand=1,
        use_mamba_kernels=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError) as exc:
        resolve(model)
    for name in FAMILIES:
        assert name in str(exc.value)


def test_dense_model_is_a_clear_error():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NoMoEError, match="no Mixture-of-Experts"):
        resolve(AutoModelForCausalLM.from_config(cfg))


def test_moe_family_with_only_dense_layers_is_no_moe():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(NoMoEError):
        moe_blocks(model)
