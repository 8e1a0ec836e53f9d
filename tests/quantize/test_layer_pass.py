"""The quantize pass over the layers (moequant/quantize/layer_pass.py)."""

from __future__ import annotations

import torch

from moequant import api
from moequant.calibration.data import CalibConfig, build_calibration
from moequant.checkpoint.loading import load_tokenizer
from moequant.checkpoint.source import CheckpointSource
from moequant.config import Method, QuantizeConfig, QuantSpec


def test_quantize_pass_frees_the_original_experts(small_calib):
    """Once a layer is quantized, the original fused experts (still referenced by source.blocks) hold no memory."""
    from moequant.checkpoint.bundled import bundled_model_path
    from moequant.quantize.layer_pass import quantize_pass

    calib = build_calibration(load_tokenizer(None), CalibConfig(str(small_calib), samples=16, seq_len=64))
    source = CheckpointSource(bundled_model_path(), lazy_experts=True)
    plan = api.make_uniform_plan(None, QuantSpec(Method.RTN, 4, 128))
    for done in quantize_pass(source, plan, calib, QuantizeConfig(progress=False), torch.bfloat16):
        assert [r.expert for r in done.rows] == list(range(8)) and done.specs == plan.layers[done.layer]
    for ref in source.blocks:
        assert all(p.device.type == "meta" for p in ref.experts.parameters())
