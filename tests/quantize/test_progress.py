"""progress.json (moequant/quantize/progress.py): a run's finished layers survive the JSON round trip."""

from __future__ import annotations

import json

from moequant.config import Method, QuantSpec, expert_spec
from moequant.quantize.progress import Progress
from moequant.quantize.rows import ExpertRow, LinearRow


def test_progress_records_layers_and_reads_back_equal():
    g4, r2 = QuantSpec(Method.GPTQ, 4, 64), QuantSpec(Method.RTN, 2, 64, sym=True)
    p = Progress({"plan": "abc"})
    assert p.next_layer == 0
    rows = [
        ExpertRow.of(0, e, 10 * e, g4, s, rel_weight_error=0.1 * e, rank=0) for e, s in enumerate([g4, r2])
    ]
    p.record(0, rows, [LinearRow("model.layers.0.mlp.gate", "rtn", 4, 0.2)], [g4, expert_spec(g4, r2)])
    p.record(1, [], [], None)  # a dense layer
    assert p.next_layer == 2
    back = Progress.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p
    assert back.used == {0: [g4, expert_spec(g4, r2)]} and back.rows[1].method == "rtn"
