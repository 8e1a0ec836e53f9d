"""One quantize run (moequant/quantize/run.py): the plan is checked against the model before anything is
written. The run's outputs are checked end to end by the CLI and API tests (tests/cli/test_quantize.py,
tests/test_api.py) and byte for byte by the resume and rank tests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moequant import api
from moequant.checkpoint.source import open_source
from moequant.config import GPTQOptions, Method, QuantizeConfig, QuantSpec
from moequant.errors import PlanError
from moequant.plan.schema import PlannedLinear
from moequant.quantize.run import check_plan, quantize


@pytest.fixture(scope="module")
def source():
    return open_source(None, lazy_experts=True)  # the bundled model: 4 MoE layers of 8 experts


def test_a_plan_that_fits_passes_and_each_misfit_is_refused(source):
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 4, 128))
    check_plan(source, plan, QuantizeConfig())  # default: act-order with static groups, no g_idx stored
    g_idx = QuantizeConfig(gptq=GPTQOptions(act_order=True, static_groups=False))
    with pytest.raises(PlanError, match=r"does not store g_idx but the quantize config does \(act_order=True, "
                       r"static_groups=False\)"):  # fmt: skip
        check_plan(source, plan, g_idx)
    with pytest.raises(PlanError, match="stores g_idx but the quantize config does not"):
        check_plan(source, replace(plan, act_order=True), QuantizeConfig())
    with pytest.raises(PlanError, match="model_type"):
        check_plan(source, replace(plan, model_type="olmoe"), QuantizeConfig())
    with pytest.raises(PlanError, match="gives layer 2 7 experts"):
        check_plan(source, replace(plan, layers={**plan.layers, 2: plan.layers[2][:7]}), QuantizeConfig())
    wrong = {"model.layers.0.self_attn.q_proj": PlannedLinear(QuantSpec(Method.RTN, 4, 128), 64, 128)}
    with pytest.raises(PlanError, match=r"q_proj \[64, 128\] is \[128, 128\] in the model"):
        check_plan(source, replace(plan, linears=wrong), QuantizeConfig())


def test_a_refused_plan_writes_nothing(source, tmp_path):
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 4, 128))
    with pytest.raises(PlanError, match="model_type"):
        quantize(None, replace(plan, model_type="olmoe"), None, tmp_path / "q", QuantizeConfig())
    assert list(tmp_path.iterdir()) == []
