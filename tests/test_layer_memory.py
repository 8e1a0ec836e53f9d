"""The memory-saving paths of the quantize pass change no byte of the result.

* experts are quantized chunk by chunk (`gptq_chunk_mb`), each chunk with only its own Hessians;
* a streamed checkpoint keeps its fused expert weights in the stored 16-bit dtype until quantized, and its
  mmapped files are dropped as soon as a layer is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from moequant import api
from moequant.arch import Activation
from moequant.calibration.data import CalibConfig, build_calibration
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.loading import load_tokenizer
from moequant.quantize_layer import expert_chunks
from moequant.source import CheckpointSource


@pytest.fixture(scope="module")
def calib():
    return build_calibration(load_tokenizer(None), CalibConfig(samples=16))


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_expert_chunks_group_by_spec_and_bound_size():
    a, b = QuantSpec(Method.GPTQ, 2, 128), QuantSpec(Method.GPTQ, 4, 128)
    specs = [a, b, a, a, b, a]
    assert expert_chunks(specs, 10, 1000) == [[0, 2, 3, 5], [1, 4]]
    assert expert_chunks(specs, 10, 25) == [[0, 2], [3, 5], [1, 4]]
    assert expert_chunks(specs, 10, 1) == [[0], [2], [3], [5], [1], [4]]  # never an empty chunk


def test_one_expert_chunks_give_the_same_bytes(calib, tmp_path):
    # mixed widths and a method without Hessians, so several spec groups are chunked
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    for e in (1, 5):
        plan.layers[0][e] = QuantSpec(Method.GPTQ, 2, 128)
    plan.layers[1][2] = QuantSpec(Method.RTN, 4, 128)
    whole = QuantizeConfig(progress=False)  # every expert of a spec in one batched call
    single = QuantizeConfig(progress=False, gptq_chunk_mb=0)  # one expert per call
    api.quantize(None, plan, calib, tmp_path / "whole", whole)
    api.quantize(None, plan, calib, tmp_path / "single", single)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "single")


def test_streamed_experts_stay_16_bit_until_quantized():
    from moequant.bundled import bundled_model_path

    stored = CheckpointSource(bundled_model_path(), experts_as_stored=True)
    plain = CheckpointSource(bundled_model_path())
    layer, ref = stored.load_layer(0), stored.blocks[0]
    assert ref.experts.gate_up_proj.dtype == torch.bfloat16
    assert layer.self_attn.q_proj.weight.dtype == torch.float32  # the rest computes in float32
    plain.load_layer(0)
    assert plain.blocks[0].experts.gate_up_proj.dtype == torch.float32
    torch.testing.assert_close(
        ref.experts.gate_up_proj.float(), plain.blocks[0].experts.gate_up_proj, rtol=0, atol=0
    )


def test_expert_outputs_equal_the_quantized_forward():
    """The next layer's inputs come from expert_outputs; they must be what the quantized experts compute."""
    from moequant.methods import HandlerOptions, quantize_stack
    from moequant.qexperts import QuantizedExperts
    from moequant.quantize_layer import ExpertInputs, expert_outputs

    torch.manual_seed(0)
    E, H, I, k = 6, 64, 96, 2
    specs = [QuantSpec(Method.RTN, b, 32) for b in (2, 3, 4, 8, 4, 2)]
    opts = HandlerOptions(False, False, 0.01, 128, torch.float32)
    qe = QuantizedExperts(
        specs, H, I, Activation.SILU_GLU, {}, has_bias=False, act_order=False, dtype=torch.float32
    )
    for e, s in enumerate(specs):
        gu = quantize_stack(torch.randn(1, 2 * I, H), None, s, opts)[0][0]
        dn = quantize_stack(torch.randn(1, H, I), None, s, opts)[0][0]
        qe.set_expert(e, gu, dn, s)
    feats = ExpertInputs([], [], [])
    for T in (1, 37, 200):
        x = torch.randn(T, H)
        idx = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # expert E-1 never routed
        w = torch.softmax(torch.randn(T, k), -1)
        feats.x.append(x), feats.idx.append(idx), feats.w.append(w), feats.shapes.append(x.shape)
    got = expert_outputs(qe, feats)
    for b in range(3):
        want = qe(feats.x[b], feats.idx[b], feats.w[b])
        assert torch.equal(got[b], want)


def test_quantize_pass_frees_the_original_experts(calib):
    """Once a layer is quantized, the original fused experts (still referenced by source.blocks) hold no memory."""
    from moequant.bundled import bundled_model_path
    from moequant.pipeline import quantize_pass

    source = CheckpointSource(bundled_model_path(), experts_as_stored=True)
    plan = api.make_uniform_plan(None, QuantSpec(Method.RTN, 4, 128))
    quantize_pass(source, plan, calib, QuantizeConfig(progress=False), torch.bfloat16)
    for ref in source.blocks:
        assert all(p.device.type == "meta" for p in ref.experts.parameters())
