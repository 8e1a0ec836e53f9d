"""Finer knapsack items: per-projection widths, group-size choice, minimax importance, GPTQ-loss damage."""

import pytest
import torch

from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig
from moequant.checkpoint.source import open_source
from moequant.config import ExpertSpec, Method, QuantSpec, expert_spec, proj_specs
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.damage import damage_from_source
from moequant.plan.knapsack import solve
from moequant.plan.schema import Plan

QUIET = ProfileConfig(batch_size=4, progress=False)


def _data(n=8, seq=32, seed=0, sources=("x",)):
    g = torch.Generator().manual_seed(seed)
    labels = [sources[i % len(sources)] for i in range(n)]
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), labels, "random ids")


def _tables(model, **kw):
    prof = api.profile(model, _data(), QUIET)
    cfg = PlanConfig(budget=Budget(bits=3.0), group_size=32, layer_probe=False, **kw)
    return prof, cfg, damage_from_source(open_source(model), prof, cfg)


def test_per_projection_items_never_lose_to_whole_experts():
    """Whole experts are a subset of the per-projection choices: with the exact solver the estimated damage at
    the same budget can only drop, and the budget still holds."""
    model = tiny_model("mixtral", seed=3)
    prof, cfg, table = _tables(model)
    assert table.damage.ndim == 3 and table.damage.shape[1] == 2
    whole = PlanConfig(budget=cfg.budget, group_size=32, layer_probe=False, per_projection=False)
    for bits in (3.0, 3.4, 4.0):
        split_plan = solve(table, Budget(bits=bits))
        whole_plan = solve(__import__("dataclasses").replace(table, config=whole), Budget(bits=bits))
        assert split_plan.average_bits() <= bits + 1e-9
        assert split_plan.estimate["damage"] <= whole_plan.estimate["damage"] * (1 + 1e-9)
    mixed = [
        s for v in solve(table, Budget(bits=3.4)).layers.values() for s in v if isinstance(s, ExpertSpec)
    ]
    assert mixed, "a per-projection plan splits some expert"


def test_group_size_is_chosen_per_item():
    model = tiny_model("mixtral", seed=3)
    prof, cfg, table = _tables(model, group_sizes=(16, 32))
    cols = cfg.columns()
    assert [(s.bits, s.group_size) for s in cols][:4] == [(2, 16), (2, 32), (3, 16), (3, 32)]
    assert (table.damage[..., 0] <= table.damage[..., 1]).all()  # finer groups, less error (RTN)
    plan = solve(table, Budget(bits=3.0))
    sizes = {
        p.group_size for v in plan.layers.values() for s in v for p in proj_specs(s) if p.method.is_integer
    }
    assert plan.average_bits() <= 3.0 + 1e-9
    single = solve(_tables(model)[2], Budget(bits=3.0))
    assert plan.estimate["damage"] <= single.estimate["damage"] * (1 + 1e-9)  # a superset of choices
    assert sizes  # the chosen items carry their group sizes into the plan
    assert plan.estimate["group_sizes"] == [16, 32]
    back = Plan.from_json(plan.to_json())
    assert back.layers == plan.layers


def test_cli_plan_items_and_flags(tmp_path, bundled_profile, profile_calib):
    """`moequant plan` from a saved profile (conftest.bundled_profile, the same calibration flags): per-projection
    items by default, whole experts with --whole-experts, and a bad --group-sizes refused."""
    from moequant.cli.main import main

    calib = [*profile_calib, "--no-layer-probe"]
    runs = {
        "split": [],
        "whole": ["--whole-experts", "--importance", "mass"],
    }
    plans = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        argv = [
            "plan",
            *calib,
            "--bits",
            "2.75",
            "--profile",
            str(bundled_profile),
            "--out",
            str(out),
            *extra,
        ]
        assert main(argv) == 0
        plans[name] = Plan.load(out)
        assert plans[name].average_bits() <= 2.75 + 1e-9
    assert not any(isinstance(s, ExpertSpec) for v in plans["whole"].layers.values() for s in v)
    assert any(isinstance(s, ExpertSpec) for v in plans["split"].layers.values() for s in v)
    assert plans["split"].estimate["items"] == "per projection (gate/up, down)"
    assert main(["plan", *calib, "--group-sizes", "64,x", "--out", str(tmp_path / "bad.json")]) == 2


def test_heldout_bits_weighs_each_experts_bits_by_routing():
    from types import SimpleNamespace

    from moequant.evals.bench.heldout_bits import routed_bits

    g2, g4 = QuantSpec(Method.GPTQ, 2, 32), QuantSpec(Method.GPTQ, 4, 32)
    plan = Plan("mixtral", {0: [g2, g4, expert_spec(g2, g4)]}, 64, 96)
    bits = [8 * plan.expert_bytes(s) / (3 * 64 * 96) for s in plan.layers[0]]
    prof = SimpleNamespace(
        layers={0: SimpleNamespace(weight_mass=torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))}
    )
    got, starved = routed_bits(plan, prof)
    assert got == pytest.approx((3 * bits[0] + bits[1]) / 4) and starved == pytest.approx(0.75)
    prof.layers[0].weight_mass = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert routed_bits(plan, prof) == (pytest.approx(bits[2]), 0.0)  # a 4-bit down projection is not starved
