"""A chunk of experts' Hessians from the routed calibration tokens (moequant/quantize/expert_hessians.py),
against direct computations of 2 / sum(w) * sum_t w_t x_t x_t^T."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moequant.arch import Activation, ExpertWeights, apply_activation
from moequant.config import CalibMode, QuantizeConfig
from moequant.quantize.expert_hessians import down_hessians, gate_up_hessians

E, H, I, K = 5, 12, 10, 2  # experts, hidden, intermediate, top-k


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in (30, 7):
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, k]
        out.append((torch.randn(T, H, generator=g), idx, torch.rand(T, K, generator=g)))
    return out


def _direct(feats: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    X, w = torch.cat(feats).double(), torch.cat(weights).double()  # [T, D], [T]
    return 2 / w.sum() * (X * w[:, None]).T @ X  # [D, D]


def _routed(batches, e: int, weighted: bool, fn=lambda x: x):
    feats, weights = [], []
    for x, idx, w in batches:
        rows, pos = torch.where(idx == e)
        feats.append(fn(x[rows]))
        weights.append(w[rows, pos] if weighted else torch.ones(len(rows)))
    return feats, weights


@pytest.mark.parametrize("weighted", [True, False])
def test_gate_up_hessians_of_a_chunk(weighted):
    batches, part = _batches(0), [3, 1]
    cfg = QuantizeConfig(weight_by_routing=weighted)
    got = gate_up_hessians(part, H, batches, cfg, "cpu")  # [2, H, H]
    for j, e in enumerate(part):
        torch.testing.assert_close(
            got[j].double(), _direct(*_routed(batches, e, weighted)), rtol=1e-5, atol=1e-6
        )


def test_gate_up_hessians_in_all_mode_take_every_token_unweighted():
    batches = _batches(1)
    got = gate_up_hessians([0, 4], H, batches, QuantizeConfig(calib_mode=CalibMode.ALL), "cpu")
    want = _direct([x for x, _, _ in batches], [torch.ones(len(x)) for x, _, _ in batches])
    for j in range(2):
        torch.testing.assert_close(got[j].double(), want, rtol=1e-5, atol=1e-6)


def test_down_hessians_read_the_activation_of_the_original_gate_up():
    torch.manual_seed(2)
    batches, part = _batches(2), [2, 0]
    w = ExpertWeights(
        torch.randn(2, 2 * I, H), torch.randn(2, H, I), torch.randn(2, 2 * I), None
    )  # chunk rows
    arch = SimpleNamespace(activation=Activation.SILU_GLU)
    cfg = QuantizeConfig(true_sequential=False)
    got = down_hessians(arch, w, part, None, batches, cfg, {})  # [2, I, I]
    for j, e in enumerate(part):
        act = lambda x, j=j: apply_activation(Activation.SILU_GLU, x @ w.gate_up[j].T + w.gate_up_bias[j], {})
        torch.testing.assert_close(
            got[j].double(), _direct(*_routed(batches, e, True, act)), rtol=1e-4, atol=1e-6
        )
