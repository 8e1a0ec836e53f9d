"""Per-layer routing statistics: the figures derived from the sums, exact merges, Jensen-Shannon divergence."""

import math

import pytest
import torch

from moequant.calibration.stats import LayerStats, js_divergence


def _stats(counts, tokens, sources=None) -> LayerStats:
    """Four experts, hidden 2, intermediate 3; every sum derived from `counts` so a test can predict it."""
    c = torch.tensor(counts, dtype=torch.int64)
    s = LayerStats(4, 2, 2, 3, tokens=tokens, counts=c)
    s.weight_mass = c.double() / 2
    s.coact = torch.diag(c)
    s.sq_in = c.double()[:, None] * torch.tensor([1.0, 4.0], dtype=torch.float64)
    s.sq_mid = c.double()[:, None] * torch.tensor([2.0, 0.0, 8.0], dtype=torch.float64)
    s.sq_all = torch.tensor([10.0, 30.0], dtype=torch.float64)
    s.by_source = {k: torch.tensor(v) for k, v in (sources or {}).items()}
    return s


def test_load_balance_figures():
    s = _stats([3, 1, 0, 0], tokens=2)
    assert s.load().tolist() == [0.75, 0.25, 0.0, 0.0]
    assert s.cv() == pytest.approx(math.sqrt(1.5))  # mean 1; (4 + 0 + 1 + 1) / 4 = 1.5
    assert s.entropy() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    balanced = _stats([2, 2, 2, 2], tokens=4)
    assert (balanced.cv(), balanced.entropy()) == (0.0, pytest.approx(1.0))
    empty = LayerStats(4, 2, 2, 3)
    assert (empty.load().tolist(), empty.cv(), empty.entropy()) == ([0.0] * 4, 0.0, 0.0)


def test_moments_are_means_and_unseen_experts_take_the_layer_mean():
    s = _stats([3, 1, 0, 0], tokens=2)
    assert s.moments_in().tolist() == [[1.0, 4.0], [1.0, 4.0], [5.0, 15.0], [5.0, 15.0]]  # sq_all / 2 tokens
    assert s.moments_mid().tolist() == [[2.0, 0.0, 8.0], [2.0, 0.0, 8.0], [0.0] * 3, [0.0] * 3]


def test_merge_adds_every_sum():
    a = _stats([3, 1, 0, 0], tokens=2, sources={"x": [3, 1, 0, 0]})
    b = _stats([0, 1, 2, 1], tokens=2, sources={"x": [0, 1, 0, 0], "y": [0, 0, 2, 1]})
    m = a.merge(b)
    assert m.tokens == 4 and m.counts.tolist() == [3, 2, 2, 1]
    assert m.weight_mass.tolist() == [1.5, 1.0, 1.0, 0.5]
    assert torch.equal(m.coact, torch.diag(torch.tensor([3, 2, 2, 1])))
    assert m.sq_all.tolist() == [20.0, 60.0]
    assert {k: v.tolist() for k, v in m.by_source.items()} == {"x": [3, 2, 0, 0], "y": [0, 0, 2, 1]}
    assert a.by_source["x"].tolist() == [3, 1, 0, 0]  # the merged ones are left as they were
    with pytest.raises(ValueError, match="differently shaped"):
        a.merge(LayerStats(4, 2, 2, 5))


def test_js_divergence():
    assert js_divergence(torch.tensor([1, 0]), torch.tensor([0, 1])) == pytest.approx(math.log(2))
    assert js_divergence(torch.tensor([2, 6]), torch.tensor([1, 3])) == pytest.approx(
        0.0
    )  # counts normalised
    p, q, m = (0.5, 0.5), (0.25, 0.75), (0.375, 0.625)
    kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m, strict=True))
    kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m, strict=True))
    want = (kl_pm + kl_qm) / 2
    assert js_divergence(torch.tensor([1, 1]), torch.tensor([1, 3])) == pytest.approx(want)
