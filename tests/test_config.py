"""Quantization specs: per-projection expert specs, their labels, parsing, JSON and bytes."""

import pytest

from moequant.config import ExpertSpec, Method, QuantSpec, expert_spec, parse_spec, spec_label
from moequant.errors import PlanError
from moequant.plan.schema import Plan, expert_nbytes, linear_nbytes


def test_expert_spec_labels_json_and_bytes():
    g3, g2 = QuantSpec(Method.GPTQ, 3, 32), QuantSpec(Method.GPTQ, 2, 32)
    assert expert_spec(g3, g3) is g3  # agreeing projections stay a plain QuantSpec
    s = expert_spec(g3, g2)
    assert isinstance(s, ExpertSpec) and spec_label(s) == "gptq:3/gptq:2"
    assert parse_spec("gptq:3/gptq:2", 32, False) == s
    with pytest.raises(PlanError, match="gate/up"):
        parse_spec("gptq:3/gptq:2/gptq:4", 32, False)
    h, i = 64, 96
    assert expert_nbytes(s, h, i) == linear_nbytes(g3, 2 * i, h) + linear_nbytes(g2, h, i)
    assert expert_nbytes(g3, h, i) > expert_nbytes(s, h, i) > expert_nbytes(g2, h, i)
    odd = ExpertSpec(
        QuantSpec(Method.GPTQ, 4, 64), QuantSpec(Method.KEEP, 16, 32)
    )  # gate/up off the default grid
    plan = Plan("mixtral", {0: [s, g3, odd]}, h, i)
    back = Plan.from_json(plan.to_json())
    assert back.layers == plan.layers
    assert back.histogram() == {
        "gptq:3": 1,
        "gptq:3/gptq:2": 1,
        "gptq:4g64/keep": 1,
    }  # off the default group size
