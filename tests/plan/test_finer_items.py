"""Finer knapsack items: per-projection widths, group-size choice, minimax importance, GPTQ-loss damage."""

import numpy as np
import pytest
import torch

from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig
from moequant.checkpoint.source import open_source
from moequant.config import ExpertSpec, Method, QuantSpec, expert_spec, parse_spec, proj_specs, spec_label
from moequant.errors import PlanError
from moequant.plan.config import Budget, DamageKind, Importance, PlanConfig
from moequant.plan.damage import damage_from_source
from moequant.plan.damage_gptq import _losses, damage_from_gptq, hessian_loss
from moequant.plan.importance import importance
from moequant.plan.knapsack import solve
from moequant.plan.schema import Plan, expert_nbytes, linear_nbytes
from moequant.quantize.methods import HandlerOptions
from moequant.quantize.pricing import gptq_pricing

QUIET = ProfileConfig(batch_size=4, progress=False)


def _data(n=8, seq=32, seed=0, sources=("x",)):
    g = torch.Generator().manual_seed(seed)
    labels = [sources[i % len(sources)] for i in range(n)]
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), labels, "random ids")


def test_expert_spec_labels_json_and_bytes():
    g3, g2 = QuantSpec(Method.GPTQ, 3, 32), QuantSpec(Method.GPTQ, 2, 32)
    assert expert_spec(g3, g3) is g3  # agreeing projections stay a plain QuantSpec
    s = expert_spec(g3, g2)
    assert isinstance(s, ExpertSpec) and spec_label(s) == "gptq:3/gptq:2"
    assert parse_spec("gptq:3/gptq:2", 32, False) == s
    with pytest.raises(PlanError, match="gate/up"):
        parse_spec("gptq:3/gptq:2/gptq:4", 32, False)
    h, i = 64, 96
    assert expert_nbytes(s, h, i) == linear_nbytes(g3, 2 * i, h) + linear_nbytes(g2, h, i)
    assert expert_nbytes(g3, h, i) > expert_nbytes(s, h, i) > expert_nbytes(g2, h, i)
    odd = ExpertSpec(
        QuantSpec(Method.GPTQ, 4, 64), QuantSpec(Method.KEEP, 16, 32)
    )  # gate/up off the default grid
    plan = Plan("mixtral", {0: [s, g3, odd]}, h, i)
    back = Plan.from_json(plan.to_json())
    assert back.layers == plan.layers
    assert back.histogram() == {
        "gptq:3": 1,
        "gptq:3/gptq:2": 1,
        "gptq:4g64/keep": 1,
    }  # off the default group size


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


def test_minimax_importance_covers_every_source():
    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, _data(n=12, sources=("a", "b", "c")), QUIET)
    mass = PlanConfig(budget=Budget(bits=3.0), importance=Importance.MASS, importance_floor=0.0)
    mm = PlanConfig(budget=Budget(bits=3.0), importance=Importance.MINIMAX, importance_floor=0.0)
    for i, s in prof.layers.items():
        a, b = importance(prof, i, mass), importance(prof, i, mm)
        assert (b >= a - 1e-12).all() and (b > a + 1e-9).any()  # some expert is routed more by one source
        mean_w = s.weight_mass / s.counts.double().clamp(min=1)
        for src, c in s.by_source.items():  # never below what any one source routes to the expert
            rate = c.double() / (float(c.sum()) / s.top_k)
            assert (b >= rate * mean_w - 1e-12).all(), src
    one = api.profile(model, _data(n=8), QUIET)  # a single source: minimax is the mass
    for i in one.layers:
        assert torch.equal(importance(one, i, mass), importance(one, i, mm))


def test_gptq_damage_is_gptq_loss_on_the_real_hessian():
    """The table's GPTQ entries are the loss tr((W-Q)H(W-Q)^T)/2 of what GPTQ returns, below RTN's on the same
    Hessian, and the per-item damage orders widths."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 48, 64, generator=gen)  # [E, N, K]
    X = torch.randn(3, 64, 256, generator=gen) * torch.linspace(0.1, 3, 64)[None, :, None]  # [E, K, T]
    H = 2 * X @ X.mT / 256  # [E, K, K]
    pricing = gptq_pricing()
    for b in (2, 3, 4):
        g = _losses(W, H, QuantSpec(Method.GPTQ, b, 32), pricing)
        r = _losses(W, H, QuantSpec(Method.RTN, b, 32), pricing)
        assert (g < r).all(), b
    mods, _ = pricing.quantize(W, H.clone(), QuantSpec(Method.GPTQ, 3, 32))
    Q = torch.stack([m.dequantize(torch.float32) for m in mods])
    # GPTQ reports the loss on its damped Hessian H + damp I (damp = 1% of mean diag H): a little above
    got, exact = _losses(W, H, QuantSpec(Method.GPTQ, 3, 32), pricing), hessian_loss(W, Q, H)
    damp = 0.01 * H.diagonal(dim1=1, dim2=2).mean(1).double()  # [E]
    np.testing.assert_allclose(
        got.numpy(), (exact + damp * ((W - Q).double() ** 2).sum((1, 2)) / 2).numpy(), rtol=2e-3
    )
    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, _data(), QUIET)
    cfg = PlanConfig(
        budget=Budget(bits=3.0), group_size=32, layer_probe=False, damage=DamageKind.GPTQ, progress=False
    )
    table = damage_from_gptq(open_source(model), prof, cfg, _data(), gptq_pricing(), batch_size=4)
    proxy = damage_from_source(open_source(model), prof, cfg)
    assert table.damage.shape == proxy.damage.shape and table.keys == proxy.keys
    d = table.damage[..., :-1]  # integer widths 2, 3, 4, 8 (last column: keep, zero)
    assert (np.diff(d, axis=-1) < 0).all()  # more bits, less loss, for every projection
    assert (table.damage[..., -1] == 0).all()
    plan = api.plan(model, prof, cfg, _data())
    assert plan.average_bits() <= 3.0 + 1e-9


def test_gptq_damage_runs_gptq_as_the_quantize_pass_does(monkeypatch):
    """The table prices GPTQ with the quantize pass's own options (act-order with static groups by default):
    before, it priced GPTQ without act-order while the quantize pass ran with it."""
    import moequant.quantize.pricing as pr
    from moequant.config import QuantizeConfig

    seen, real = [], pr.quantize_stack
    monkeypatch.setattr(
        pr, "quantize_stack", lambda W, H, spec, opts: seen.append(opts) or real(W, H, spec, opts)
    )
    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, _data(), QUIET)
    cfg = PlanConfig(
        budget=Budget(bits=3.0), group_size=32, layer_probe=False, damage=DamageKind.GPTQ, progress=False
    )
    damage_from_gptq(open_source(model), prof, cfg, _data(), gptq_pricing(), batch_size=4)
    quantize_pass = HandlerOptions(QuantizeConfig().gptq, torch.bfloat16)
    assert seen and all(o == quantize_pass for o in seen)
    assert quantize_pass.gptq.act_order and quantize_pass.gptq.static_groups


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
