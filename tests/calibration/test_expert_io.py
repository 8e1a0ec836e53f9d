"""What an experts module receives on the calibration batches, and the stand-in that returns precomputed outputs."""

import pytest
import torch

from moequant.arch import decoder_layers, experts_call_args, get_arch, moe_blocks, set_experts
from moequant.arch.tiny import tiny_model
from moequant.calibration.capture import capture_inputs, run_layer
from moequant.calibration.expert_io import PrecomputedExperts, collect_expert_inputs


def _layer_inputs(model):
    arch = get_arch(model)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    return arch, capture_inputs(model, decoder_layers(model, arch), [ids[:1], ids[1:]], torch.device("cpu"))


def test_collected_inputs_are_what_the_experts_get_and_the_experts_never_run():
    model = tiny_model("mixtral", seed=2)
    arch, inputs = _layer_inputs(model)
    ref = moe_blocks(model, arch)[0]
    seen, runs = [], []
    pre = ref.experts.register_forward_pre_hook(
        lambda _m, a, k: seen.append(experts_call_args(a, k)) and None, with_kwargs=True
    )
    try:
        with torch.no_grad():
            for b in range(2):
                run_layer(ref.layer, inputs.batch(b), inputs.kwargs[b][0])
    finally:
        pre.remove()
    post = ref.experts.register_forward_hook(lambda *_: runs.append(1))
    try:
        got = collect_expert_inputs(ref.layer, ref, inputs)
    finally:
        post.remove()
    assert runs == []  # the layer stopped at its experts
    assert len(got.x) == len(got.idx) == len(got.w) == 2 and got.dtype == torch.float32
    for b, (x, idx, w) in enumerate(seen):
        assert got.shapes[b] == x.shape
        assert torch.equal(got.x[b], x.reshape(-1, x.shape[-1]))
        assert torch.equal(got.idx[b], idx.reshape(x.shape[0], -1).long())
        assert torch.equal(got.w[b], w.reshape(x.shape[0], -1).float())


def test_precomputed_outputs_stand_in_for_the_experts():
    model = tiny_model("mixtral", seed=2)
    arch, inputs = _layer_inputs(model)
    ref = moe_blocks(model, arch)[0]
    outputs, want = [], []
    hook = ref.experts.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        with torch.no_grad():
            want = [run_layer(ref.layer, inputs.batch(b), inputs.kwargs[b][0]) for b in range(2)]
    finally:
        hook.remove()
    set_experts(arch, ref, PrecomputedExperts([o + 1 for o in outputs]))  # outputs of other experts
    with torch.no_grad():
        got = [run_layer(ref.layer, inputs.batch(b), inputs.kwargs[b][0]) for b in range(2)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w + 1)  # the layer adds the experts' output to its residual stream
    set_experts(arch, ref, PrecomputedExperts([outputs[0][:, :3]]))
    with pytest.raises(RuntimeError, match="precomputed experts output"), torch.no_grad():
        run_layer(ref.layer, inputs.batch(0), inputs.kwargs[0][0])
