"""How much expert work goes at once (moequant/quantize/chunks.py)."""

from __future__ import annotations

import torch

from moequant.arch import ExpertWeights
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.quantize.chunks import chunk_bytes, chunk_weights, expert_chunks, take


def test_expert_chunks_group_by_spec_and_bound_size():
    a, b = QuantSpec(Method.GPTQ, 2, 128), QuantSpec(Method.GPTQ, 4, 128)
    specs = [a, b, a, a, b, a]
    assert expert_chunks(specs, 10, 1000) == [[0, 2, 3, 5], [1, 4]]
    assert expert_chunks(specs, 10, 25) == [[0, 2], [3, 5], [1, 4]]
    assert expert_chunks(specs, 10, 1) == [[0], [2], [3], [5], [1], [4]]  # never an empty chunk


def test_expert_chunks_of_one_ranks_experts():
    a, b = QuantSpec(Method.GPTQ, 2, 128), QuantSpec(Method.GPTQ, 4, 128)
    assert expert_chunks([a, b, a, a, b, a], 10, 25, experts=[1, 2, 3, 5]) == [[1], [2, 3], [5]]


def test_take_is_a_view_for_a_contiguous_range_and_a_copy_otherwise():
    t = torch.arange(24.0).reshape(6, 4)
    view, copy = take(t, [2, 3, 4]), take(t, [0, 2, 5])
    assert torch.equal(view, t[2:5]) and view.data_ptr() == t[2].data_ptr()
    assert torch.equal(copy, t[[0, 2, 5]]) and copy.data_ptr() != t.data_ptr()


def test_chunk_weights_slice_the_loaded_block():
    torch.manual_seed(0)
    w = ExpertWeights(torch.randn(4, 16, 8), torch.randn(4, 8, 8), torch.randn(4, 16), torch.randn(4, 8))
    wc = chunk_weights(None, None, w, [1, 3], None)
    full = (w.gate_up, w.down, w.gate_up_bias, w.down_bias)
    for got, whole in zip((wc.gate_up, wc.down, wc.gate_up_bias, wc.down_bias), full, strict=True):
        assert torch.equal(got, whole[[1, 3]])


def test_chunk_bytes_on_the_cpu_is_the_configured_budget():
    assert chunk_bytes(QuantizeConfig(gptq_chunk_mb=3), torch.device("cpu")) == 3 * 2**20
