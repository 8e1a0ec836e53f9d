"""The damage table read a chunk of experts at a time (lazy checkpoint source) equals the one from loaded
layers, expert for expert, and never reads a whole layer's experts at once."""

import numpy as np
import pytest
import torch

from moequant.arch.tiny import save_tiny
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig, profile_pass
from moequant.checkpoint.source import open_source
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.damage import damage_from_source


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])  # plain, and transposed + interleaved + biases
def test_chunked_damage_equals_loaded(tmp_path, model_type, monkeypatch):
    save_tiny(model_type, tmp_path, seed=1, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    data = CalibData(torch.randint(0, 256, (4, 32), generator=g), ["r"] * 4, "random ids")
    prof = profile_pass(open_source(str(tmp_path)), data, ProfileConfig(batch_size=2, progress=False))
    config = PlanConfig(Budget(bits=3.0))
    loaded = damage_from_source(open_source(str(tmp_path)), prof, config)
    lazy_source = open_source(str(tmp_path), lazy_experts=True)
    reads = []
    read = lazy_source.read_experts
    monkeypatch.setattr(lazy_source, "read_experts", lambda i, e: reads.append(list(e)) or read(i, e))
    hidden, inter = lazy_source.arch.expert_dims(lazy_source.blocks[0].experts)
    lazy = damage_from_source(lazy_source, prof, config, chunk_mb=3.5 * 2 * 3 * hidden * inter / 2**20)
    assert max(len(r) for r in reads) == 3 < lazy_source.blocks[0].num_experts
    assert lazy.keys == loaded.keys
    np.testing.assert_array_equal(lazy.damage, loaded.damage)
    assert (loaded.damage[..., 0] > loaded.damage[..., -1]).all()  # fewer bits, more damage: a real table
