"""The planner: a plan within the budget that beats uniform widths on estimated damage, bits moved to heavily
routed experts, the layer probe recorded, the same plan from a saved profile."""

import pytest
import torch
from helpers import planned, random_calib

from moequant import api
from moequant.arch import moe_blocks
from moequant.arch.tiny import tiny_model
from moequant.calibration.profiler import ProfileConfig
from moequant.calibration.report import load_profile, save_profile
from moequant.checkpoint.source import open_source
from moequant.config import Method, QuantSpec, proj_specs, spec_bits
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.damage import damage_from_source
from moequant.plan.schema import expert_nbytes

QUIET = ProfileConfig(batch_size=4, progress=False)


def _skewed(model_type, seed):
    """A tiny model whose routers favour experts 0 and 1, as trained routers favour some experts."""
    model = tiny_model(model_type, seed=seed)
    with torch.no_grad():
        for b in moe_blocks(model):
            b.router.weight[:2] *= 4
    return model


def test_plan_meets_budget_and_beats_uniform_on_estimated_damage():
    model = _skewed("mixtral", 4)
    h, i = model.config.hidden_size, model.config.intermediate_size
    uniform_bits = 8 * expert_nbytes(QuantSpec(Method.GPTQ, 3, 32), h, i) / (3 * h * i)  # 3 + overhead
    plan, prof, cfg = planned(model, bits=uniform_bits)
    assert plan.average_bits() <= uniform_bits + 1e-9
    assert len(plan.histogram()) > 1  # the budget is spread over several widths
    t = damage_from_source(open_source(model), prof, cfg)
    keys, table = t.keys, t.damage  # [n, 2, c]: gate/up and down rows
    col = {s.bits: j for j, s in enumerate(cfg.columns())}
    chosen = sum(
        table[r, p, col[spec.bits]]
        for r, (i, e) in enumerate(keys)
        for p, spec in enumerate(proj_specs(plan.layers[i][e]))
    )
    uniform3 = table[..., col[3]].sum()  # same bytes, every expert at 3 bits
    assert chosen < uniform3
    assert chosen == pytest.approx(plan.estimate["damage"])


def test_importance_moves_bits_to_heavily_routed_experts():
    model = _skewed("qwen3_moe", 6)
    plan, prof, _ = planned(model, bits=3.5, importance_floor=0.0)
    for i, specs in plan.layers.items():
        mass = prof.layers[i].weight_mass
        bits = torch.tensor([spec_bits(s) for s in specs], dtype=torch.float64)
        top, bottom = mass.argsort(descending=True)[:2], mass.argsort()[:2]
        assert bits[top].mean() > bits[bottom].mean()


def test_everything_fits_keeps_16_bit():
    plan, *_ = planned(tiny_model("olmoe", seed=1), bits=16)
    assert plan.histogram() == {"keep": 16}


def test_make_plan_for_records_probe(tmp_path):
    model = _skewed("qwen3_moe", 3)
    cfg = PlanConfig(budget=Budget(bits=3.5), group_size=32, probe_samples=4)
    plan, prof = api.make_plan_for(model, random_calib(), cfg, batch_size=4, progress=False)
    assert set(plan.estimate["loss_increase"]) == {"0", "1"}
    assert plan.average_bits() <= 3.5


def test_plan_from_a_saved_profile_equals_the_fresh_one(tmp_path):
    model = _skewed("mixtral", 5)
    prof = api.profile(model, random_calib(), QUIET)
    save_profile(prof, tmp_path / "p", plots=False)
    cfg = PlanConfig(budget=Budget(bits=3.2), group_size=32, probe_samples=4)
    fresh = api.plan(model, prof, cfg, random_calib())
    again = api.plan(model, load_profile(tmp_path / "p"), cfg, random_calib())
    assert again.layers == fresh.layers and len(fresh.histogram()) > 1
    assert again.estimate == fresh.estimate  # same damage sum, same probe record
