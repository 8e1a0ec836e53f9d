"""Report rows (moequant/quantize/rows.py): the JSON quant_report.json and progress.json hold, and back."""

from __future__ import annotations

import json

from moequant.config import Method, QuantSpec, expert_spec
from moequant.quantize.rows import ExpertRow, LinearRow

G3, G2, R3 = QuantSpec(Method.GPTQ, 3, 128), QuantSpec(Method.GPTQ, 2, 128), QuantSpec(Method.RTN, 3, 128)


def test_expert_row_json_keys_in_the_report_order_and_back():
    row = ExpertRow.of(2, 5, 17, expert_spec(G3, G2), expert_spec(R3, G2), rel_weight_error=0.25, rank=1,
                       note="fallback: 17 routed tokens < 32, identity-Hessian RTN",
                       down_diag={"gptq_loss": 0.5, "damp": 0.01})  # fmt: skip
    d = row.to_json()
    assert list(d) == ["layer", "expert", "tokens", "planned", "method", "bits", "down_method", "down_bits",
                       "rel_weight_error", "rank", "note", "down_gptq_loss", "down_damp"]  # fmt: skip
    assert (d["planned"], d["method"], d["bits"], d["down_method"], d["down_bits"]) == ("gptq:3/gptq:2", "rtn", 3,
                                                                                         "gptq", 2)  # fmt: skip
    back = ExpertRow.from_json(json.loads(json.dumps(d)))
    assert back == row and back.to_json() == d


def test_expert_row_with_one_spec_has_no_down_fields():
    row = ExpertRow.of(0, 1, 300, G3, G3, rel_weight_error=0.1, rank=0, gate_up_diag={"gptq_loss": 2.0, "damp": 0.01},
                       down_diag={"gptq_loss": 3.0, "damp": 0.02})  # fmt: skip
    d = row.to_json()
    assert "down_method" not in d and "note" not in d
    assert (d["gate_up_gptq_loss"], d["down_gptq_loss"], d["down_damp"]) == (2.0, 3.0, 0.02)
    assert ExpertRow.from_json(d) == row


def test_linear_row_json_and_back():
    row = LinearRow("model.layers.0.self_attn.q_proj", "gptq", 4, 0.031, {"gptq_loss": 1.5, "damp": 0.01})
    d = row.to_json()
    assert list(d) == ["module", "method", "bits", "rel_weight_error", "gptq_loss", "damp"]
    assert LinearRow.from_json(json.loads(json.dumps(d))) == row
