"""Plan files: the JSON round trip and its validation against the model, the bytes an expert costs."""

import json

import pytest
from helpers import planned

from moequant.arch import moe_blocks
from moequant.arch.tiny import tiny_model
from moequant.config import Method, QuantSpec
from moequant.errors import PlanError
from moequant.plan.schema import Plan, expert_nbytes


def test_plan_json_round_trip_and_validation(tmp_path):
    model = tiny_model("mixtral", seed=4)
    plan, *_ = planned(model, bits=3.5)
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back.layers == plan.layers
    blocks = {b.layer_idx: b.num_experts for b in moe_blocks(model)}
    back.validate("mixtral", blocks, plan.hidden, plan.intermediate)
    d = json.loads(path.read_text())
    d["layers"]["0"][0] = "gptq:5"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="invalid width 5"):
        Plan.load(path)
    d["layers"]["0"][0] = "awq:4"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="unknown method 'awq'"):
        Plan.load(path)
    d["layers"]["0"][0] = {"method": "gptq", "bits": 4, "group_size": 12}
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="group size 12"):
        Plan.load(path)
    d["layers"]["0"] = ["rtn:4"] * 6
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="6 experts, the model has 8"):
        Plan.load(path).validate("mixtral", blocks, plan.hidden, plan.intermediate)
    with pytest.raises(PlanError, match="model_type 'mixtral'"):
        plan.validate("olmoe", blocks, plan.hidden, plan.intermediate)


def test_expert_bytes_count_overhead():
    spec = QuantSpec(Method.GPTQ, 4, 128, sym=False)
    h, i = 256, 512
    b = expert_nbytes(spec, h, i)
    bits = 8 * b / (3 * h * i)
    assert bits == pytest.approx(4 + 16 / 128 + 8 / 128)  # codes + fp16 scale + uint8 zero per group
    assert 8 * expert_nbytes(QuantSpec(Method.KEEP, 16), h, i) / (3 * h * i) == 16
