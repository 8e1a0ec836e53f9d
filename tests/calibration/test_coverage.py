"""Calibration coverage: tokens per expert against each projection's input width, in quant_report.json."""

import json
import logging
import statistics
from typing import NamedTuple

import pytest

from moequant import api
from moequant.calibration.coverage import coverage, expert_tokens, to_json, warn_if_short
from moequant.config import Method, QuantizeConfig, QuantSpec

BUNDLED_HIDDEN, BUNDLED_INTER = 128, 256  # moequant/assets/tiny-moe/config.json


class _Count(NamedTuple):
    layer: int
    expert: int
    tokens: int


def test_numbers_and_flags_of_hand_made_counts():
    rows = [_Count(3, e, t) for e, t in enumerate([5, 300, 40, 200])]
    rows += [_Count(1, e, t) for e, t in reversed(list(enumerate([900, 700, 1000])))]
    tokens = expert_tokens(rows)
    assert tokens == {1: [900, 700, 1000], 3: [5, 300, 40, 200]}  # expert order, whatever the row order
    low, high = coverage(tokens, hidden=128, intermediate=512)[::-1]
    assert (low.layer, low.median_tokens, low.min_tokens) == (3, 120.0, 5)  # (40 + 200) / 2
    assert low.short == ["gate_up", "down"]
    assert (high.median_tokens, high.min_tokens, high.short) == (900.0, 700, [])
    mid = coverage({0: [200, 200, 200]}, hidden=128, intermediate=512)[0]
    assert mid.short == ["down"]  # enough for gate/up (width 128), not for down (width 512)
    report = to_json([high, low])
    assert report["rank_deficient_layers"] == [3]
    assert report["layers"][1] == {
        "layer": 3,
        "experts": 4,
        "median_tokens": 120.0,
        "min_tokens": 5,
        "gate_up_input_width": 128,
        "down_input_width": 512,
        "median_below_width": ["gate_up", "down"],
        "rank_deficient": True,
    }


def test_one_warning_lists_the_short_layers(caplog):
    layers = coverage({0: [10, 20], 1: [5000, 6000], 2: [1, 2]}, hidden=64, intermediate=64)
    with caplog.at_level(logging.WARNING, logger="moequant"):
        assert warn_if_short(layers) == [0, 2]
        assert warn_if_short(layers[1:2]) == []
    assert len(caplog.records) == 1
    assert "2 of 3 MoE layers [0, 2]" in caplog.records[0].getMessage()


def _run(tmp_path, calib, samples, seq_len, method=Method.GPTQ, bits=4):
    """Profile and quantize the bundled model on `samples` x `seq_len` tokens of `calib` (conftest.small_calib:
    bundled-corpus text, without tokenizing the whole corpus for each run)."""
    tok = api.load_tokenizer(None)
    data = api.calibration(tok, api.CalibConfig(str(calib), samples=samples, seq_len=seq_len))
    profile = api.profile(None, data, api.ProfileConfig(progress=False))
    plan = api.make_uniform_plan(None, QuantSpec(method, bits, 32))
    out = tmp_path / f"q-{samples}x{seq_len}-{method.value}"
    api.quantize(None, plan, data, out, QuantizeConfig(progress=False))
    report = json.loads((out / "quant_report.json").read_text())["calibration_coverage"]
    return report, profile


def _from_profile(profile, layer):
    counts = profile.layers[layer].counts.tolist()
    return statistics.median(counts), min(counts)


@pytest.mark.usefixtures("one_thread")
def test_few_samples_warn_and_the_numbers_match_the_profile(tmp_path, caplog, small_calib):
    with caplog.at_level(logging.WARNING, logger="moequant"):
        report, profile = _run(tmp_path, small_calib, 4, 32)
    warnings = [r for r in caplog.records if "calibration too small for GPTQ" in r.getMessage()]
    assert len(warnings) == 1  # once, listing the layers
    layers = {r["layer"]: r for r in report["layers"]}
    assert sorted(layers) == sorted(profile.layers) == [0, 1, 2, 3]
    for r in layers.values():
        assert (r["gate_up_input_width"], r["down_input_width"]) == (BUNDLED_HIDDEN, BUNDLED_INTER)
        assert r["experts"] == 8
    # 128 tokens x top-2 over 8 experts: a median near 32, far below both widths
    assert report["rank_deficient_layers"] == [0, 1, 2, 3]
    assert f"{report['rank_deficient_layers']}" in warnings[0].getMessage()
    # layer 0 sees the same inputs in the profile pass and the quantize pass: the same routing
    assert (layers[0]["median_tokens"], layers[0]["min_tokens"]) == _from_profile(profile, 0)
    assert layers[0]["median_tokens"] < BUNDLED_HIDDEN


@pytest.mark.usefixtures("one_thread")
def test_kept_experts_route_as_the_profile_in_every_layer(tmp_path, caplog, small_calib):
    """With every expert kept 16-bit, each layer's inputs in the quantize pass are the profile's: the report's
    numbers must be the profile's counts in every layer. Keep uses no Hessian, so no warning."""
    with caplog.at_level(logging.WARNING, logger="moequant"):
        report, profile = _run(tmp_path, small_calib, 4, 32, Method.KEEP, 16)
    for r in report["layers"]:
        assert (r["median_tokens"], r["min_tokens"]) == _from_profile(profile, r["layer"]), r["layer"]
    assert report["rank_deficient_layers"] == [0, 1, 2, 3]  # recorded, though no Hessian is built
    assert not [r for r in caplog.records if "calibration too small" in r.getMessage()]


@pytest.mark.usefixtures("one_thread")
def test_enough_tokens_do_not_warn(tmp_path, caplog, small_calib):
    with caplog.at_level(logging.WARNING, logger="moequant"):
        report, profile = _run(tmp_path, small_calib, 16, 128)
    assert not [r for r in caplog.records if "calibration too small" in r.getMessage()]
    assert report["rank_deficient_layers"] == []
    for r in report["layers"]:
        assert r["median_tokens"] >= BUNDLED_INTER and not r["rank_deficient"]
    first = report["layers"][0]
    assert (first["median_tokens"], first["min_tokens"]) == _from_profile(profile, 0)
