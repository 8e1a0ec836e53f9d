"""Streaming a model layer by layer (capture + next_inputs) gives the hidden states of its own forward, for
families whose layers take more than hidden states: state carried from layer to layer (GLM-5's shared top-k
indices), inputs passed by position (Gemma 4's per-layer inputs); and refuses inputs it cannot rebuild."""

import pytest
import torch
from helpers import layer_output

from moequant.arch import decoder_layers, get_arch
from moequant.arch.tiny import tiny_model
from moequant.calibration.capture import capture_inputs, next_inputs
from moequant.errors import UnsupportedModelError


def _whole_forward_last_layer(model, layers, ids) -> torch.Tensor:
    return layer_output(model, layers[-1], ids)


def _streamed_last_layer(model, layers, ids) -> torch.Tensor:
    inputs = capture_inputs(model, layers, [ids], torch.device("cpu"))
    for i, layer in enumerate(layers):
        next_inputs(layer, inputs, i)
    return inputs.hidden[0]


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("qwen3_moe", {}),
        # layer 1 reuses layer 0's top-k token selection (prev_topk_indices) instead of running its own indexer
        ("glm_moe_dsa", {"indexer_types": ["full", "shared"]}),
        ("gemma4", {}),  # per-layer inputs passed by position
    ],
)
def test_streamed_layers_match_the_model_forward(model_type, overrides):
    model = tiny_model(model_type, seed=1, **overrides)
    layers = decoder_layers(model, get_arch(model))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    want = _whole_forward_last_layer(model, layers, ids)
    got = _streamed_last_layer(model, layers, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_topk_is_carried_not_recomputed():
    """Without the carried indices the shared layer would see none and fail, or differ: check that the streamed
    pass really hands layer 0's selection to layer 1."""
    model = tiny_model("glm_moe_dsa", seed=1, indexer_types=["full", "shared"])
    layers = decoder_layers(model, get_arch(model))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    inputs = capture_inputs(model, layers, [ids], torch.device("cpu"))
    assert inputs.kwargs[0][1]["prev_topk_indices"] is None  # not known before layer 0 has run
    next_inputs(layers[0], inputs, 0)
    carried = inputs.kwargs[0][1]["prev_topk_indices"]
    assert torch.is_tensor(carried) and carried.shape[:2] == (2, 24)


def test_inputs_built_from_earlier_layers_outputs_are_refused():
    # every layer a block boundary: layer 2's block states hold layer 0's output, which capture cannot know
    model = tiny_model(
        "inkling2_text",
        seed=1,
        num_hidden_layers=3,
        n_layers_per_attn_res_block=1,
        layer_types=["hybrid_sliding", "hybrid", "hybrid"],
    )
    layers = decoder_layers(model, get_arch(model))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(UnsupportedModelError, match="block_states"):
        capture_inputs(model, layers, [ids], torch.device("cpu"))
