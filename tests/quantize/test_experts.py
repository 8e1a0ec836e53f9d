"""The memory-saving paths of the quantize pass change no byte of the result.

* experts are quantized chunk by chunk (`gptq_chunk_mb`), each chunk with only its own Hessians;
* a streamed checkpoint loads a layer without its fused expert weights and reads each chunk's experts
  (16-bit, as stored) when it quantizes them; its mmapped files are dropped as soon as they are read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from moequant import api
from moequant.calibration.data import CalibConfig, build_calibration
from moequant.checkpoint.loading import load_tokenizer
from moequant.config import Method, QuantizeConfig, QuantSpec


@pytest.fixture(scope="module")
def calib(small_calib):
    """1,024 calibration tokens of bundled-corpus text (conftest.small_calib) in two batches of the quantize
    pass (batch size 8): about 256 routed to each expert (every GPTQ expert has a Hessian), and two token sets
    for the token groups to join or split."""
    return build_calibration(load_tokenizer(None), CalibConfig(str(small_calib), samples=16, seq_len=64))


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_one_expert_chunks_give_the_same_bytes(calib, tmp_path):
    # mixed widths and a method without Hessians, so several spec groups are chunked; 1,024 calibration tokens
    # (about 256 routed to each expert: every GPTQ expert has a Hessian) keep the two passes short
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    for e in (1, 5):
        plan.layers[0][e] = QuantSpec(Method.GPTQ, 2, 128)
    plan.layers[1][2] = QuantSpec(Method.RTN, 4, 128)
    whole = QuantizeConfig(progress=False)  # every expert of a spec in one batched call
    single = QuantizeConfig(progress=False, gptq_chunk_mb=0)  # one expert per call
    api.quantize(None, plan, calib, tmp_path / "whole", whole)
    api.quantize(None, plan, calib, tmp_path / "single", single)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "single")


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_token_groups_change_no_byte(calib, tmp_path, monkeypatch, mode):
    """Batches that share one pass over an expert's dequantized weights (down-projection Hessians, the next
    layer's inputs) give the same bytes as one pass per batch, routed or all-experts calibration."""
    from moequant.config import CalibMode
    from moequant.kernels import reference

    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    cfg = QuantizeConfig(progress=False, calib_mode=CalibMode(mode))
    api.quantize(None, plan, calib, tmp_path / "grouped", cfg)
    monkeypatch.setattr(reference, "_TOKEN_GROUP_BYTES", 1)  # every batch alone
    api.quantize(None, plan, calib, tmp_path / "alone", cfg)
    assert _digests(tmp_path / "grouped") == _digests(tmp_path / "alone")
