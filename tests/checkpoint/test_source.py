"""Model sources: a model streamed from its safetensors folder gives what the model in memory gives."""

import torch

from moequant import api
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig

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
