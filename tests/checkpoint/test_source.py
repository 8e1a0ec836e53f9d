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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """The bit test finds every NaN and +-Inf, in any position and layout, and passes the extremes of the range
    (largest finite, subnormals, -0)."""
    from moequant.checkpoint.source import all_finite

    g = torch.Generator().manual_seed(0)
    base = (torch.randn(64, 48, generator=g) * 3).to(dtype)
    info = torch.finfo(dtype)
    base[0, :4] = torch.tensor([info.max, -info.max, info.tiny / 4, -0.0], dtype=torch.float64).to(dtype)
    assert all_finite(base) and all_finite(base.T) and all_finite(base[:, ::3]) and all_finite(base[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for r, c in ((0, 0), (63, 47), (17, 5)):
            t = base.clone()
            t[r, c] = bad
            assert not all_finite(t) and not all_finite(t.T), (bad, r, c)
            assert all_finite(t) == bool(torch.isfinite(t).all())


def test_lazy_reads_check_each_expert_once(monkeypatch):
    """A pass reads each expert several times (profile, damage, probe, quantize): its rows are checked for
    NaN/Inf the first time only, and a later read of a new expert still is."""
    import moequant.checkpoint.source as source_mod
    from moequant.checkpoint.bundled import bundled_model_path

    checked = []
    real = source_mod.check_finite
    monkeypatch.setattr(
        source_mod, "check_finite", lambda name, t: checked.append((name, t.shape[0])) or real(name, t)
    )
    lazy = CheckpointSource(bundled_model_path(), lazy_experts=True)
    lazy.load_layer(1)
    checked.clear()  # the layer's other tensors
    lazy.read_experts(1, [0, 1, 2])
    first = len(checked)
    assert first  # the per-expert keys as read, and the fused rows of experts 0-2
    lazy.read_experts(1, [2, 1])
    assert len(checked) == first  # nothing new
    lazy.read_experts(1, [1, 5])
    fused = [n for n, rows in checked[:first] if rows == 3]  # the fused parameters, once each
    new = checked[first:]  # expert 5's own keys (the bundled checkpoint stores experts one key each) and rows
    assert sorted(n for n, rows in new if rows == 1) == sorted(fused)
    assert all(".experts.5." in n for n, rows in new if rows != 1)
    assert len(new) == len(fused) + (first - len(fused)) // 3
