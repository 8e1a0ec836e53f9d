"""Plan settings: budgets that cannot be met, the widths the vLLM target needs."""

import pytest
import torch

from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig
from moequant.errors import PlanError
from moequant.plan.config import Budget, PlanConfig, Target

QUIET = ProfileConfig(batch_size=4, progress=False)


def _data(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), ["x"] * n, "random ids")


def _planned(model, bits=3.0, **kw):
    """The planner's own entry point (without the layer probe, which these tests do not measure)."""
    prof = api.profile(model, _data(), QUIET)
    cfg = PlanConfig(budget=Budget(bits=bits), group_size=32, layer_probe=False, **kw)
    return api.plan(model, prof, cfg, _data()), prof, cfg


def test_impossible_budgets():
    with pytest.raises(PlanError, match="impossible budget"):
        Budget(bits=17)
    with pytest.raises(PlanError, match="impossible budget"):
        Budget(bits=0)
    with pytest.raises(PlanError, match="exactly one budget"):
        Budget()
    model = tiny_model("olmoe", seed=1)
    with pytest.raises(PlanError, match="impossible budget: even 2-bit experts need"):
        _planned(model, bits=2.0)  # 2 bits + scale/zero overhead > 2.0


def test_vllm_target_needs_symmetric_4_and_8():
    with pytest.raises(PlanError, match="symmetric 4/8-bit"):
        PlanConfig(budget=Budget(bits=5.0), widths=(4, 8), sym=False, target=Target.VLLM)
    with pytest.raises(PlanError, match="symmetric 4/8-bit"):
        PlanConfig(budget=Budget(bits=5.0), widths=(3, 4, 8), sym=True, target=Target.VLLM)
