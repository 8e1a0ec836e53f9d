"""What --resume checks before it continues (moequant/quantize/resume.py); the replay itself is checked end
to end by the runs that compare a resumed folder with a clean one (tests/cli/test_reliability.py,
tests/plan/test_non_expert_auto.py, tests/quantize/test_ranks.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moequant import api
from moequant.calibration.data import CalibData
from moequant.checkpoint.writer import CheckpointWriter
from moequant.config import GPTQOptions, Method, QuantizeConfig, QuantSpec
from moequant.errors import MoEQuantError
from moequant.quantize.progress import Progress
from moequant.quantize.resume import fingerprint, resumed_progress

PLAN = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 4, 128))
DATA = CalibData(torch.arange(64).reshape(2, 32), ["a", "b"], "test")


def test_fingerprint_changes_with_every_input_but_progress_bars_and_the_estimate():
    base = fingerprint(PLAN, DATA, QuantizeConfig(), torch.bfloat16, {"hidden_size": 128})
    plan3 = replace(PLAN, layers={**PLAN.layers, 0: [QuantSpec(Method.GPTQ, 3, 128)] * 8})
    others = [
        fingerprint(plan3, DATA, QuantizeConfig(), torch.bfloat16, {"hidden_size": 128}),
        fingerprint(
            PLAN,
            CalibData(DATA.input_ids + 1, DATA.labels, "x"),
            QuantizeConfig(),
            torch.bfloat16,
            {"hidden_size": 128},
        ),  # fmt: skip
        fingerprint(
            PLAN,
            DATA,
            QuantizeConfig(gptq=GPTQOptions(act_order=False)),
            torch.bfloat16,
            {"hidden_size": 128},
        ),
        fingerprint(PLAN, DATA, QuantizeConfig(), torch.float16, {"hidden_size": 128}),
        fingerprint(PLAN, DATA, QuantizeConfig(), torch.bfloat16, {"hidden_size": 256}),
    ]
    assert all(o != base for o in others) and len({str(o) for o in others}) == len(others)
    same = fingerprint(replace(PLAN, estimate={"bits": 4}), DATA, QuantizeConfig(progress=False), torch.bfloat16,
                       {"hidden_size": 128})  # fmt: skip
    assert same == base


def test_resumed_progress_reads_back_and_refuses_other_inputs(tmp_path):
    expected = fingerprint(PLAN, DATA, QuantizeConfig(), torch.bfloat16, {})
    writer = CheckpointWriter(tmp_path / "out")
    progress = Progress(expected)
    progress.record(0, [], [], [QuantSpec(Method.GPTQ, 4, 128)] * 8)
    writer.write_progress(progress.to_json())
    again = CheckpointWriter(tmp_path / "out", resume=True)
    assert again.resuming and resumed_progress(again, expected) == progress
    with pytest.raises(MoEQuantError, match="started with other inputs"):
        resumed_progress(again, {**expected, "plan": "0" * 16})
