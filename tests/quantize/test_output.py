"""The output's config.json header (moequant/quantize/output.py): the model's config, the saved dtype and the
quantization_config of a plan, marked incomplete (with how to resume) until the folder is finalized."""

from __future__ import annotations

import torch

from moequant import api
from moequant.checkpoint.source import open_source
from moequant.config import Method, QuantSpec
from moequant.quantize.output import ConfigHeader


def test_config_json_is_incomplete_with_a_resume_hint_until_complete():
    source = open_source(None, lazy_experts=True)
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    header = ConfigHeader(source, plan, torch.float16)
    draft = header.config_json(plan, "incomplete", "out.partial")
    qc = draft["quantization_config"]
    assert draft["dtype"] == "float16" and draft["model_type"] == source.model.config.model_type
    assert qc["status"] == "incomplete" and "--resume (folder out.partial)" in qc["resume_hint"]
    assert qc["experts"]["0"] == ["gptq:3"] * 8
    done = header.config_json(plan, "complete", "out.partial")["quantization_config"]
    assert done["status"] == "complete" and "resume_hint" not in done
    assert {k: v for k, v in done.items() if k != "status"} == {
        k: v for k, v in qc.items() if k not in ("status", "resume_hint")
    }
