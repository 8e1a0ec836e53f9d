"""Model sources: a model streamed from its safetensors folder gives what the model in memory gives."""

from pathlib import Path

import pytest
import torch

from moequant import api
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig
from moequant.checkpoint.source import CheckpointSource
from moequant.errors import CheckpointError

QUIET = ProfileConfig(batch_size=4, progress=False)


def _data(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), ["x"] * n, "random ids")


def test_streaming_profile_equals_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    from moequant.arch.tiny import save_tiny

    save_tiny("deepseek_v3", tmp_path / "m", seed=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    data = _data()
    mem = api.profile(model, data, QUIET)
    stream = api.profile(str(tmp_path / "m"), data, QUIET)
    assert sorted(mem.layers) == sorted(stream.layers)
    for i, s in mem.layers.items():
        t = stream.layers[i]
        assert torch.equal(s.counts, t.counts) and torch.equal(s.coact, t.coact)
        torch.testing.assert_close(s.sq_in, t.sq_in, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.weight_mass, t.weight_mass, rtol=1e-12, atol=0)


def _mappings(folder) -> int:
    """How many mappings of files under `folder` this process holds (Linux: /proc/self/maps lines)."""
    return sum(str(folder) in ln for ln in Path("/proc/self/maps").read_text().splitlines())


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
    before = _mappings(bundled_model_path())  # other tests' objects may hold the file mapped: count, not set
    for part in ([3], [0, 1, 2], [7, 2, 5]):  # a single expert, a contiguous range, out of order
        got = lazy.read_experts(1, part)
        assert set(got) == {"gate_up_proj", "down_proj"}
        for name, t in got.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t.float(), getattr(whole, name)[part])
        assert _mappings(bundled_model_path()) <= before  # the layer's file is unmapped again
    with pytest.raises(CheckpointError):
        lazy.read_experts(1, [8])  # the bundled model has experts 0-7
