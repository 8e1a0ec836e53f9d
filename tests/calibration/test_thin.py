"""Too thin a calibration for GPTQ: counted from a routing profile or estimated from the distinct tokens."""

import pytest
import torch

from moequant.calibration.data import CalibData
from moequant.calibration.profiler import Profile
from moequant.calibration.stats import LayerStats
from moequant.calibration.thin import THIN_SHARE, distinct_tokens, estimate, from_profile, refuse_if_thin
from moequant.errors import CalibrationError


def _profile(counts: list[list[int]]) -> Profile:
    layers = {}
    for i, row in enumerate(counts):
        s = LayerStats(num_experts=len(row), top_k=2, hidden=4, intermediate=4)
        s.counts = torch.tensor(row, dtype=torch.int64)
        layers[i] = s
    return Profile("m", "c", tokens=512, layers=layers)


def test_the_demos_one_starved_expert_of_32_passes():
    check = from_profile(_profile([[5] + [900] * 7] + [[900] * 8] * 3), min_tokens=32)
    assert (check.below, check.experts, check.measured) == (1, 32, True)
    assert refuse_if_thin(check) is check


def test_over_a_quarter_below_min_tokens_is_refused_with_the_numbers_and_the_fixes():
    assert THIN_SHARE == 0.25
    at_quarter = from_profile(_profile([[0, 0, 100, 100, 100, 100, 100, 100]] * 4), min_tokens=32)
    assert at_quarter.below == 8 and not at_quarter.too_thin  # exactly a quarter: still runs
    thin = from_profile(_profile([[0, 10, 31, 100, 100, 100, 100, 100]] * 4), min_tokens=32)
    assert thin.below == 12 and thin.too_thin
    with pytest.raises(CalibrationError) as err:
        refuse_if_thin(thin)
    line = str(err.value)
    assert "\n" not in line
    for needle in (
        "512 calibration tokens",
        "12 of 32 experts",
        "--min-tokens 32",
        "--samples",
        "--seq-len",
        "--calib-mode all",
        "--allow-thin-calibration",
    ):
        assert needle in line, line


def test_the_estimate_counts_a_repeated_window_once():
    window = torch.arange(4)
    data = CalibData(window.repeat(128, 1), ["x"] * 128, "three words")  # 512 tokens, 4 distinct
    assert data.tokens == 512 and distinct_tokens(data) == 4
    check = estimate(data, top_k=2, layer_experts={0: 8, 1: 8}, hessian_experts={0: 8, 1: 6}, min_tokens=32)
    assert (check.tokens, check.experts, check.below, check.measured) == (4, 14, 14, False)
    assert check.too_thin and "distinct calibration tokens" in check.message()
    varied = CalibData(
        torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0)), ["x"] * 16, "t"
    )
    ok = estimate(varied, top_k=2, layer_experts={0: 8}, hessian_experts={0: 8}, min_tokens=32)
    assert ok.below == 0 and not ok.too_thin
