"""Plan settings: budgets that cannot be met, the widths the vLLM target needs."""

import pytest
from helpers import planned

from moequant.arch.tiny import tiny_model
from moequant.errors import PlanError
from moequant.plan.config import Budget, PlanConfig, Target


def test_impossible_budgets():
    with pytest.raises(PlanError, match="impossible budget"):
        Budget(bits=17)
    with pytest.raises(PlanError, match="impossible budget"):
        Budget(bits=0)
    with pytest.raises(PlanError, match="exactly one budget"):
        Budget()
    model = tiny_model("olmoe", seed=1)
    with pytest.raises(PlanError, match="impossible budget: even 2-bit experts need"):
        planned(model, bits=2.0)  # 2 bits + scale/zero overhead > 2.0


def test_vllm_target_needs_symmetric_4_and_8():
    with pytest.raises(PlanError, match="symmetric 4/8-bit"):
        PlanConfig(budget=Budget(bits=5.0), widths=(4, 8), sym=False, target=Target.VLLM)
    with pytest.raises(PlanError, match="symmetric 4/8-bit"):
        PlanConfig(budget=Budget(bits=5.0), widths=(3, 4, 8), sym=True, target=Target.VLLM)
