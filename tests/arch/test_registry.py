"""A model's MoE blocks through its adapter: which decoder layers hold one, the Linears outside the routed
experts, swapping a block's experts for a while, the state a layer takes from the layer before it."""

import torch

from moequant.arch import block_ref, decoder_layers, experts_swapped, get_arch, moe_blocks, non_expert_linears
from moequant.arch.registry import carried_input
from moequant.arch.tiny import tiny_model


def test_non_expert_linears_leave_out_the_experts_the_router_and_the_gates():
    model = tiny_model("qwen2_moe")
    layer = decoder_layers(model, get_arch(model))[0]
    linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "mlp.shared_expert_gate" in linears  # an nn.Linear, but the shared expert's gate
    assert non_expert_linears(layer, get_arch(model)) == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
    ]


def test_a_dense_layer_has_no_moe_block():
    model = tiny_model("deepseek_v3")  # first_k_dense_replace: layer 0 has a dense MLP
    arch = get_arch(model)
    layers = decoder_layers(model, arch)
    assert block_ref(arch, 0, layers[0]) is None
    ref = block_ref(arch, 1, layers[1])
    assert (ref.layer_idx, ref.num_experts, ref.top_k) == (1, 8, 2)
    assert ref.experts is layers[1].mlp.experts and ref.router is layers[1].mlp.gate
    assert [b.layer_idx for b in moe_blocks(model, arch)] == [1]


def test_experts_swapped_runs_the_stand_in_and_puts_the_experts_back():
    model = tiny_model("mixtral")
    arch = get_arch(model)
    ref = moe_blocks(model, arch)[0]
    original, stand_in = ref.experts, torch.nn.Identity()
    with experts_swapped(arch, ref, stand_in):
        assert ref.block.experts is stand_in and ref.experts is original
    assert ref.block.experts is original
    try:
        with experts_swapped(arch, ref, stand_in):
            raise KeyError("inside")
    except KeyError:
        pass
    assert ref.block.experts is original  # back after an exception too
    with experts_swapped(arch, None, stand_in):  # a dense layer: nothing to swap
        assert ref.block.experts is original


def test_carried_input_names_the_keyword_of_the_previous_layers_state():
    glm = tiny_model("glm_moe_dsa", indexer_types=["full", "shared"])
    assert [carried_input(layer) for layer in decoder_layers(glm, get_arch(glm))] == ["prev_topk_indices"] * 2
    qwen = tiny_model("qwen2_moe")
    assert carried_input(decoder_layers(qwen, get_arch(qwen))[0]) is None


def test_carried_input_also_finds_state_a_layer_returns_under_its_own_name():
    """Kolibri-1.1's layers take `index_pool` and return `hidden_states, index_pool`; Zaya's take
    `prev_router_hidden_states`. Streamed layer by layer, each gets the one before's state: the streamed model's
    logits equal the whole forward's."""
    from moequant.calibration.capture import capture_inputs, next_inputs

    for model_type, name in (("kolibri1_1", "index_pool"), ("zaya", "prev_router_hidden_states")):
        model = tiny_model(model_type)
        layers = decoder_layers(model, get_arch(model))
        assert {carried_input(layer) for layer in layers} == {name}
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            inputs = capture_inputs(model, layers, [ids], "cpu")
            for i, layer in enumerate(layers):
                next_inputs(layer, inputs, i)
            got = model.lm_head(model.model.norm(inputs.hidden[0]))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
