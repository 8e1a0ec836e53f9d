"""Bit allocation: exact knapsack, budgets, plan files."""

import itertools
import json

import numpy as np
import pytest
import torch

from moequant import api
from moequant.arch import moe_blocks
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig
from moequant.calibration.report import load_profile, save_profile
from moequant.checkpoint.source import open_source
from moequant.cli.main import main
from moequant.config import Method, QuantSpec, proj_specs, spec_bits
from moequant.errors import PlanError
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.damage import damage_from_source
from moequant.plan.knapsack import solve_mckp
from moequant.plan.schema import Plan, expert_nbytes

QUIET = ProfileConfig(batch_size=4, progress=False)

CFG = PlanConfig(budget=Budget(bits=3.0), group_size=32)


def _data(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), ["x"] * n, "random ids")


def test_mckp_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, w = 6, 4
        cost = np.sort(rng.integers(1, 50, size=(n, w)), axis=1)[:, ::-1].astype(float)  # more bits cost more
        damage = np.sort(rng.random((n, w)), axis=1)  # and damage less
        capacity = float(rng.uniform(cost.min(1).sum(), cost.max(1).sum()))
        best = min(
            (sum(damage[i, c] for i, c in enumerate(combo)), combo)
            for combo in itertools.product(range(w), repeat=n)
            if sum(cost[i, c] for i, c in enumerate(combo)) <= capacity
        )
        choice = solve_mckp(damage, cost, capacity, CFG)
        assert cost[np.arange(n), choice].sum() <= capacity + 1e-9
        assert damage[np.arange(n), choice].sum() == pytest.approx(best[0], rel=1e-9, abs=1e-12), trial


def _planned(model, bits=3.0, **kw):
    """The planner's own entry point (without the layer probe, which these tests do not measure)."""
    prof = api.profile(model, _data(), QUIET)
    cfg = PlanConfig(budget=Budget(bits=bits), group_size=32, layer_probe=False, **kw)
    return api.plan(model, prof, cfg, _data()), prof, cfg


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
    plan, prof, cfg = _planned(model, bits=uniform_bits)
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
    plan, prof, _ = _planned(model, bits=3.5, importance_floor=0.0)
    for i, specs in plan.layers.items():
        mass = prof.layers[i].weight_mass
        bits = torch.tensor([spec_bits(s) for s in specs], dtype=torch.float64)
        top, bottom = mass.argsort(descending=True)[:2], mass.argsort()[:2]
        assert bits[top].mean() > bits[bottom].mean()


def test_impossible_budgets():
    with pytest.raises(PlanError, match="impossible budget"):
        Budget(bits=17)
    with pytest.raises(PlanError, match="impossible budget"):
        Budget(bits=0)
    with pytest.raises(PlanError, match="exactly one budget"):
        Budget()
    model = tiny_model("olmoe", seed=1)
    with pytest.raises(PlanError, match="impossible budget: even 2-bit experts need"):
        _planned(model, bits=2.0)  # 2 bits + scale/zero overhead > 2.0


def test_everything_fits_keeps_16_bit():
    plan, *_ = _planned(tiny_model("olmoe", seed=1), bits=16)
    assert plan.histogram() == {"keep": 16}


def test_plan_json_round_trip_and_validation(tmp_path):
    model = tiny_model("mixtral", seed=4)
    plan, *_ = _planned(model, bits=3.5)
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back.layers == plan.layers
    blocks = {b.layer_idx: b.num_experts for b in moe_blocks(model)}
    back.validate("mixtral", blocks, plan.hidden, plan.intermediate)
    d = json.loads(path.read_text())
    d["layers"]["0"][0] = "gptq:5"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="invalid width 5"):
        Plan.load(path)
    d["layers"]["0"][0] = "awq:4"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="unknown method 'awq'"):
        Plan.load(path)
    d["layers"]["0"][0] = {"method": "gptq", "bits": 4, "group_size": 12}
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="group size 12"):
        Plan.load(path)
    d["layers"]["0"] = ["rtn:4"] * 6
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="6 experts, the model has 8"):
        Plan.load(path).validate("mixtral", blocks, plan.hidden, plan.intermediate)
    with pytest.raises(PlanError, match="model_type 'mixtral'"):
        plan.validate("olmoe", blocks, plan.hidden, plan.intermediate)


def test_expert_bytes_count_overhead():
    spec = QuantSpec(Method.GPTQ, 4, 128, sym=False)
    h, i = 256, 512
    b = expert_nbytes(spec, h, i)
    bits = 8 * b / (3 * h * i)
    assert bits == pytest.approx(4 + 16 / 128 + 8 / 128)  # codes + fp16 scale + uint8 zero per group
    assert 8 * expert_nbytes(QuantSpec(Method.KEEP, 16), h, i) / (3 * h * i) == 16


def test_streaming_profile_equals_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    from moequant.arch.tiny import save_tiny

    save_tiny("deepseek_v3", tmp_path / "m", seed=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    data = _data()
    mem = api.profile(model, data, QUIET)
    stream = api.profile(str(tmp_path / "m"), data, QUIET)
    assert sorted(mem.layers) == sorted(stream.layers)
    for i, s in mem.layers.items():
        t = stream.layers[i]
        assert torch.equal(s.counts, t.counts) and torch.equal(s.coact, t.coact)
        torch.testing.assert_close(s.sq_in, t.sq_in, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.weight_mass, t.weight_mass, rtol=1e-12, atol=0)


def test_layer_probe_restores_weights_and_scales_layers(small_calib):
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.plan.probe import calibrate_damage, layer_loss_increase

    model = load_model(None)  # the bundled trained model on real text: 2-bit experts must cost loss
    text = CalibConfig(str(small_calib), samples=6, seq_len=128)  # bundled-corpus text (conftest.small_calib)
    ids = build_calibration(load_tokenizer(None), text).input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inc, base = layer_loss_increase(model, ids, bits=2, group_size=128, sym=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # every weight restored exactly
    assert set(inc) == {0, 1, 2, 3} and all(v > 0 for v in inc.values()) and base > 0
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    damage = np.array([[4.0, 1.0], [2.0, 0.5], [1.0, 0.2], [1.0, 0.3]])  # widths (2, 3)
    scaled, scales = calibrate_damage(damage, keys, 0, {0: 0.6, 1: 0.1})
    assert scaled[:2, 0].sum() == pytest.approx(0.6) and scaled[2:, 0].sum() == pytest.approx(0.1)
    assert scaled[0, 1] / scaled[0, 0] == pytest.approx(0.25)  # within-layer ratios kept
    _, floored = calibrate_damage(damage, keys, 0, {0: 0.6, 1: -0.01})
    assert floored[1] * 2.0 == pytest.approx(0.6)  # a layer whose loss fell gets the smallest rise seen


def test_make_plan_for_records_probe(tmp_path):
    model = _skewed("qwen3_moe", 3)
    cfg = PlanConfig(budget=Budget(bits=3.5), group_size=32, probe_samples=4)
    plan, prof = api.make_plan_for(model, _data(), cfg, batch_size=4, progress=False)
    assert set(plan.estimate["loss_increase"]) == {"0", "1"}
    assert plan.average_bits() <= 3.5


def test_plan_from_a_saved_profile_equals_the_fresh_one(tmp_path):
    model = _skewed("mixtral", 5)
    prof = api.profile(model, _data(), QUIET)
    save_profile(prof, tmp_path / "p", plots=False)
    cfg = PlanConfig(budget=Budget(bits=3.2), group_size=32, probe_samples=4)
    fresh = api.plan(model, prof, cfg, _data())
    again = api.plan(model, load_profile(tmp_path / "p"), cfg, _data())
    assert again.layers == fresh.layers and len(fresh.histogram()) > 1
    assert again.estimate == fresh.estimate  # same damage sum, same probe record


def test_plan_command_plans_from_a_saved_profile_without_profiling(
    tmp_path, monkeypatch, bundled_profile, profile_calib, one_thread
):
    """`moequant plan --profile` of a saved `moequant profile` folder (conftest.bundled_profile, made with the
    same calibration flags on one thread, as here) plans, layer probe included, exactly as a plan that
    profiles, and profiles nothing."""
    calib = profile_calib
    assert main(["plan", *calib, "--bits", "3.2", "--out", str(tmp_path / "a.json")]) == 0

    def no_profiling(*args, **kwargs):
        raise AssertionError("moequant plan --profile profiled again")

    monkeypatch.setattr(api, "profile_pass", no_profiling)
    argv = [
        "plan",
        *calib,
        "--bits",
        "3.2",
        "--profile",
        str(bundled_profile),
        "--out",
        str(tmp_path / "b.json"),
    ]
    assert main(argv) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["layers"] == b["layers"] and a["estimate"] == b["estimate"]
