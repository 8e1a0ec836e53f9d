"""The memory-saving paths of the quantize pass change no byte of the result.

* experts are quantized chunk by chunk (`gptq_chunk_mb`), each chunk with only its own Hessians;
* a streamed checkpoint loads a layer without its fused expert weights and reads each chunk's experts
  (16-bit, as stored) when it quantizes them; its mmapped files are dropped as soon as they are read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from moequant import api
from moequant.calibration.data import CalibConfig, build_calibration
from moequant.checkpoint.loading import load_tokenizer
from moequant.checkpoint.source import CheckpointSource
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.errors import CheckpointError


@pytest.fixture(scope="module")
def calib(small_calib):
    """1,024 calibration tokens of bundled-corpus text (conftest.small_calib) in two batches of the quantize
    pass (batch size 8): about 256 routed to each expert (every GPTQ expert has a Hessian), and two token sets
    for the token groups to join or split."""
    return build_calibration(load_tokenizer(None), CalibConfig(str(small_calib), samples=16, seq_len=64))


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_one_expert_chunks_give_the_same_bytes(calib, tmp_path):
    # mixed widths and a method without Hessians, so several spec groups are chunked; 1,024 calibration tokens
    # (about 256 routed to each expert: every GPTQ expert has a Hessian) keep the two passes short
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    for e in (1, 5):
        plan.layers[0][e] = QuantSpec(Method.GPTQ, 2, 128)
    plan.layers[1][2] = QuantSpec(Method.RTN, 4, 128)
    whole = QuantizeConfig(progress=False)  # every expert of a spec in one batched call
    single = QuantizeConfig(progress=False, gptq_chunk_mb=0)  # one expert per call
    api.quantize(None, plan, calib, tmp_path / "whole", whole)
    api.quantize(None, plan, calib, tmp_path / "single", single)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "single")


def test_token_groups_bound_bytes_and_never_split_a_set():
    from moequant.kernels.reference import token_groups

    assert token_groups([3, 3, 3], 1, budget=24) == [[0, 1], [2]]  # 12 bytes per set
    assert token_groups([10, 1, 1], 1, budget=8) == [[0], [1, 2]]  # an oversized set goes alone
    assert token_groups([], 5) == []


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_token_groups_change_no_byte(calib, tmp_path, monkeypatch, mode):
    """Batches that share one pass over an expert's dequantized weights (down-projection Hessians, the next
    layer's inputs) give the same bytes as one pass per batch, routed or all-experts calibration."""
    from moequant.config import CalibMode
    from moequant.kernels import reference

    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    cfg = QuantizeConfig(progress=False, calib_mode=CalibMode(mode))
    api.quantize(None, plan, calib, tmp_path / "grouped", cfg)
    monkeypatch.setattr(reference, "_TOKEN_GROUP_BYTES", 1)  # every batch alone
    api.quantize(None, plan, calib, tmp_path / "alone", cfg)
    assert _digests(tmp_path / "grouped") == _digests(tmp_path / "alone")


def test_lazy_experts_load_without_expert_weights_and_read_chunks_as_stored():
    """The quantize pass's source loads a layer without its fused experts; a chunk read gives exactly those
    experts' rows of the eagerly loaded layer, 16-bit as stored, and leaves no file of the layer mapped."""
    from moequant.checkpoint.bundled import bundled_model_path

    lazy = CheckpointSource(bundled_model_path(), lazy_experts=True)
    plain = CheckpointSource(bundled_model_path())
    layer, ref = lazy.load_layer(1), lazy.blocks[1]
    assert all(p.device.type == "meta" for p in ref.experts.parameters())
    assert layer.self_attn.q_proj.weight.dtype == torch.float32  # the rest loads as usual
    plain.load_layer(1)
    whole = plain.blocks[1].experts
    for part in ([3], [0, 1, 2], [7, 2, 5]):  # a single expert, a contiguous range, out of order
        got = lazy.read_experts(1, part)
        assert set(got) == {"gate_up_proj", "down_proj"}
        for name, t in got.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t.float(), getattr(whole, name)[part])
        assert not lazy._handles  # the layer's file is unmapped again
    with pytest.raises(CheckpointError):
        lazy.read_experts(1, [8])  # the bundled model has experts 0-7


def test_row_slices_dequantize_exactly():
    """PackedWeight.dequantize_rows equals rows of dequantize (act-order g_idx included); every storage
    module is covered by dequantized_rows; bitsandbytes storage comes whole."""
    from moequant.config import GPTQOptions
    from moequant.modules import qlinear
    from moequant.quantize.methods import HandlerOptions, quantize_stack

    torch.manual_seed(1)
    W = torch.randn(1, 50, 96)
    H = torch.eye(96)[None] + 0.1
    for spec, act_order in (
        (QuantSpec(Method.GPTQ, 3, 32), True),
        (QuantSpec(Method.RTN, 4, 32, sym=True), False),
    ):
        opts = HandlerOptions(GPTQOptions(act_order=act_order, static_groups=False), torch.float32)
        mod = quantize_stack(W, H if spec.method is Method.GPTQ else None, spec, opts)[0][0]
        full = mod.dequantize(torch.float32)  # [50, 96]
        assert torch.equal(mod.dequantize_rows(7, 31), full[7:31])
        got = torch.cat([d for _, _, d in qlinear.dequantized_rows(mod)])
        assert torch.equal(got, full)
    bnb = quantize_stack(
        W,
        None,
        QuantSpec(Method.BNB_NF4, 4, 64),
        HandlerOptions(GPTQOptions(act_order=False, static_groups=False), torch.float32),
    )[0][0]
    assert [(a, b) for a, b, _ in qlinear.dequantized_rows(bnb)] == [(0, 50)]
