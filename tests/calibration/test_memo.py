"""The attention's outputs replayed on a layer's second run over the same inputs (calibration/memo.py)."""

import copy

import pytest
import torch

from moequant.arch import decoder_layers, get_arch, memoizable_children, moe_blocks
from moequant.arch.tiny import tiny_model
from moequant.calibration.capture import capture_inputs, next_inputs
from moequant.calibration.expert_io import collect_expert_inputs
from moequant.calibration.memo import ForwardMemo


def _setup(family: str):
    model = tiny_model(family, seed=3)
    arch = get_arch(model)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    batches = [ids[:2], ids[2:]]  # two batches of different shapes
    inputs = capture_inputs(model, decoder_layers(model, arch), batches, torch.device("cpu"))
    return arch, moe_blocks(model, arch)[0], inputs


def _matmuls(modules) -> list[int]:
    """A counter of calls of the nn.Linears inside `modules` (attention computes through them)."""
    calls = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"])
def test_the_second_run_replays_the_attention_and_gives_the_same_bits(family):
    arch, ref, inputs = _setup(family)
    memo = ForwardMemo.for_layer(ref.layer, arch, inputs)
    assert "self_attn" in memo.modules and arch.block not in memo.modules
    plain = copy.deepcopy(inputs)
    next_inputs(ref.layer, plain, ref.layer_idx)  # the layer run whole, attention computed

    collect_expert_inputs(ref.layer, ref, inputs, memo)  # the run up to the experts records the attention
    assert [len(c) for c in memo.calls.values()] == [2] * len(memo.modules)  # once per batch
    calls = _matmuls(memo.modules.values())
    next_inputs(ref.layer, inputs, ref.layer_idx, memo=memo)
    assert calls == []  # nothing inside the attention ran
    assert all(len(c) == 0 for c in memo.calls.values())  # what was replayed is dropped
    for b in range(2):
        assert torch.equal(inputs.hidden[b], plain.hidden[b])


def test_only_modules_with_a_weight_matrix_outside_the_moe_block_are_replayed():
    arch, ref, _ = _setup("olmoe")
    names = set(memoizable_children(ref.layer, arch))
    assert names == {"self_attn"}  # not the norms, not the MoE block


def test_calls_past_the_recorded_ones_compute_and_another_shape_is_refused():
    arch, ref, inputs = _setup("mixtral")
    memo = ForwardMemo.for_layer(ref.layer, arch, inputs)
    collect_expert_inputs(ref.layer, ref, inputs, memo)
    attn = memo.modules["self_attn"]
    kwargs = inputs.kwargs[0][ref.layer_idx]
    with memo.replaying(), torch.no_grad():
        next_inputs(ref.layer, inputs, ref.layer_idx)  # both recorded calls replayed
        calls = _matmuls([attn])
        next_inputs(ref.layer, inputs, ref.layer_idx)  # nothing left: the attention computes
        assert calls
    assert "forward" not in attn.__dict__  # the module's own forward is back

    memo = ForwardMemo.for_layer(ref.layer, arch, inputs)
    collect_expert_inputs(ref.layer, ref, inputs, memo)
    h = inputs.hidden[1]  # batch 1's shape where batch 0's was recorded
    with memo.replaying(), torch.no_grad(), pytest.raises(RuntimeError, match="replayed for an input"):
        ref.layer(h, **kwargs)


@pytest.mark.parametrize("host", [False, True])
def test_a_layer_writing_into_what_the_module_returned_does_not_change_the_replay(host):
    """The record is a copy, also in host memory on a CPU-only run (where .to("cpu") is the tensor itself)."""
    attn = torch.nn.Linear(4, 4)
    memo = ForwardMemo({"self_attn": attn}, host=host)
    x = torch.randn(2, 4)
    with memo.recording(), torch.no_grad():
        y = attn(x)
        want = y.clone()
        y.mul_(2)  # the layer writes into the module's output
    with memo.replaying(), torch.no_grad():
        assert torch.equal(attn(x), want)


def test_quantized_attention_is_still_replayed():
    """A quantized Linear keeps its weight matrix in buffers: its module is still memoizable."""
    from moequant.config import Method, QuantSpec
    from moequant.modules.qlinear import QuantLinear

    arch, ref, _ = _setup("olmoe")
    q_proj = ref.layer.self_attn.q_proj
    ref.layer.self_attn.q_proj = QuantLinear.empty(QuantSpec(Method.RTN, 4, 32), q_proj, torch.float32)
    for name in ("k_proj", "v_proj", "o_proj"):  # every Linear of the attention quantized
        lin = getattr(ref.layer.self_attn, name)
        setattr(
            ref.layer.self_attn, name, QuantLinear.empty(QuantSpec(Method.RTN, 4, 32), lin, torch.float32)
        )
    assert "self_attn" in memoizable_children(ref.layer, arch)
