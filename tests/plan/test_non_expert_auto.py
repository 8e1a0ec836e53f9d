"""--non-expert auto: attention, shared experts and dense MLPs as knapsack items priced by the streamed probe."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moequant  # noqa: F401  (registers the quantized format with transformers)
from moequant import api
from moequant.arch import non_expert_linears
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import ProfileConfig
from moequant.checkpoint.source import open_source
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.errors import PlanError
from moequant.modules.qlinear import QuantLinear
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.knapsack import solve
from moequant.plan.planner import damage_for
from moequant.plan.schema import Plan, PlannedLinear
from moequant.quantizers.rtn import rtn_quantize

QUIET = ProfileConfig(batch_size=4, progress=False)
QCFG = QuantizeConfig(progress=False, batch_size=4, min_tokens=4)


def _data(n=16, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), ["x"] * n, "random ids")


def _cfg(bits=3.0, **kw):
    return PlanConfig(budget=Budget(bits=bits), group_size=32, non_expert_auto=True, probe_samples=16,
                      probe_draws=4, progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def deepseek():
    """A tiny DeepSeek-V3: a dense first layer (attention + MLP), then MoE layers with shared experts."""
    model = tiny_model("deepseek_v3", seed=5)
    data = _data()
    prof = api.profile(model, data, QUIET)
    table = damage_for(model, prof, _cfg(), data)
    return model, data, table


def test_items_cover_every_non_expert_linear_and_more_bits_cost_less(deepseek):
    model, _, table = deepseek
    source = open_source(model)
    layers = model.model.layers
    want = {
        f"model.layers.{i}.{n}"
        for i, layer in enumerate(layers)
        for n in non_expert_linears(layer, source.arch)
    }
    got = {it.prefix + n for it in table.linear_items for n, _, _ in it.linears}
    assert got == want and "lm_head" not in got
    names = {it.name for it in table.linear_items}
    assert {"model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.mlp.shared_experts"} <= names
    cols = table.config.columns()
    ints = [c for c, s in enumerate(cols) if s.method.is_integer]
    keep = [c for c, s in enumerate(cols) if s.method is Method.KEEP]
    ld = table.linear_damage
    assert ld.shape == (len(table.linear_items), len(cols))
    assert (np.diff(ld[:, ints], axis=1) < 0).all()  # 2 > 3 > 4 > 8 bits, every item
    assert (ld[:, ints] > 0).all() and (ld[:, keep] == 0).all()
    # the dense layer 0 is below the first MoE layer: the backward stream must reach it
    layer0 = [m for m, it in enumerate(table.linear_items) if it.layer == 0]
    assert layer0 and (ld[np.ix_(layer0, ints)] > 0).all()


@torch.no_grad()
def _logp(model, ids):
    """[N, L-1, V] next-token log-probabilities at every predicting position of `ids`."""
    return model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)


def test_probe_estimate_matches_measured_kl_of_rounding_attention(deepseek):
    """The second-order estimate of one item at RTN 2-bit against the KL measured by rounding it for real."""
    model, data, table = deepseek
    ids = data.input_ids[:16]
    m = next(k for k, it in enumerate(table.linear_items) if it.name == "model.layers.1.self_attn")
    item = table.linear_items[m]
    col = table.config.columns().index(QuantSpec(Method.GPTQ, 2, 32))
    ref = _logp(model, ids)  # [N, L-1, V]
    layer = model.model.layers[1]
    saved = {}
    for n, _, _ in item.linears:
        lin = layer.get_submodule(n)
        saved[n] = lin.weight.data.clone()
        lin.weight.data = rtn_quantize(lin.weight.data.float(), 2, 32, False).dequantize(lin.weight.dtype)[0]
    try:
        rounded = _logp(model, ids)
    finally:
        for n, w in saved.items():
            layer.get_submodule(n).weight.data = w
    measured = float((ref.exp() * (ref - rounded)).sum(-1).mean())
    estimated = float(table.linear_damage[m, col])
    assert 0.5 < estimated / measured < 2.0, (estimated, measured)


def test_plan_holds_the_budget_over_experts_and_linears(deepseek, tmp_path):
    model, _, table = deepseek
    plan = solve(table, Budget(bits=3.0))
    assert set(plan.linears) == {it.prefix + n for it in table.linear_items for n, _, _ in it.linears}
    total = plan.total_expert_bytes() + plan.total_linear_bytes()
    assert total <= 3.0 * plan.num_planned_params() / 8
    assert 2.9 < plan.average_bits() <= 3.0
    assert plan.num_planned_params() > plan.num_expert_params()
    # every item's Linears share a spec; the probe prices attention of the dense layer high enough to get bits
    for it in table.linear_items:
        assert len({plan.linears[it.prefix + n].spec for n, _, _ in it.linears}) == 1
    # cheaper budget, no more bytes anywhere: the GB budget counts the 16-bit rest (embeddings, lm_head, norms)
    rest = table.non_expert_bytes - 2 * sum(it.params for it in table.linear_items)
    gb_plan = solve(table, Budget(gb=(total + rest) / 1e9))
    assert gb_plan.total_expert_bytes() + gb_plan.total_linear_bytes() <= total
    back = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back.linears == plan.linears and back.average_bits() == plan.average_bits()


def test_quantize_stores_each_linear_at_its_spec_and_reloads(deepseek, tmp_path):
    model, data, table = deepseek
    plan = solve(table, Budget(bits=3.0))
    first = next(iter(plan.linears))  # edited to keep, as a user may: it stays an nn.Linear
    was = plan.linears[first]
    plan.linears[first] = PlannedLinear(QuantSpec(Method.KEEP, 16, 32), was.out_features, was.in_features)
    model = tiny_model("deepseek_v3", seed=5)  # a fresh copy: quantize works in place
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    api.quantize(model, plan, data, tmp_path / "q", QCFG, save_dtype=torch.float32)
    with torch.no_grad():
        quant = model(input_ids=ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    for name, lin in plan.linears.items():
        mod = loaded.get_submodule(name)
        if lin.spec.method is Method.KEEP:
            assert isinstance(mod, torch.nn.Linear), name
        else:
            assert isinstance(mod, QuantLinear) and mod.w.bits == lin.spec.bits, name
    assert isinstance(loaded.lm_head, torch.nn.Linear)  # auto plans the decoder layers only
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, quant)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (
        first not in qc["non_expert"]["modules"] and len(qc["non_expert"]["modules"]) == len(plan.linears) - 1
    )


def test_plan_checks_against_the_model(deepseek, tmp_path):
    model, data, table = deepseek
    plan = solve(table, Budget(bits=3.0))
    name = next(iter(plan.linears))
    bad = Plan.from_json(plan.to_json())
    bad.linears[name] = PlannedLinear(QuantSpec(Method.GPTQ, 4, 32), 7, 9)
    with pytest.raises(PlanError, match=r"\[7, 9\]"):
        api.quantize(tiny_model("deepseek_v3", seed=5), bad, data, tmp_path / "q", QCFG)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    with pytest.raises(PlanError, match="not both"):
        Plan.from_json(plan.to_json() | {"non_expert": QuantSpec().to_json()})
    with pytest.raises(PlanError, match="streamed layer probe"):
        PlanConfig(budget=Budget(bits=3.0), non_expert_auto=True, layer_probe=False)


def test_cli_refuses_auto_where_it_cannot_plan(tmp_path, capsys):
    from moequant.cli.main import main

    assert (
        main(["quantize", "--uniform", "--bits", "4", "--non-expert", "auto", "--out", str(tmp_path / "a")])
        == 2
    )
    assert "--non-expert auto" in capsys.readouterr().err
    assert main(["plan", "--non-expert", "auto", "--no-layer-probe", "--out", str(tmp_path / "p.json")]) == 2
    assert "streamed layer probe" in capsys.readouterr().err


def test_resume_replays_the_planned_linears(deepseek, tmp_path, monkeypatch):
    """A run stopped after layer 0 and resumed writes the bytes of an uninterrupted run (the replay rebuilds
    layer 0's quantized Linears from its shard, each at its planned spec)."""
    from helpers import fail_shard_write
    from safetensors.torch import load_file

    _, data, table = deepseek
    plan = solve(table, Budget(bits=3.0))
    restore = fail_shard_write(monkeypatch, "model-layer-00001.safetensors")
    with pytest.raises(Exception, match="No space left"):
        api.quantize(
            tiny_model("deepseek_v3", seed=5), plan, data, tmp_path / "r", QCFG, save_dtype=torch.float32
        )
    restore()
    api.quantize(tiny_model("deepseek_v3", seed=5), plan, data, tmp_path / "r", QCFG, save_dtype=torch.float32,
                 resume=True)  # fmt: skip
    api.quantize(
        tiny_model("deepseek_v3", seed=5), plan, data, tmp_path / "c", QCFG, save_dtype=torch.float32
    )
    for name in ("model-layer-00000.safetensors", "model-layer-00001.safetensors"):
        a, b = load_file(tmp_path / "r" / name), load_file(tmp_path / "c" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("model.layers.1.self_attn.") and ".w." in k for k in a)  # quantized attention
    rows = [json.loads((tmp_path / d / "quant_report.json").read_text())["non_expert"] for d in ("r", "c")]
    layers = {r["module"].split(".")[2] for r in rows[1] if r["module"].startswith("model.layers.")}
    assert rows[0] == rows[1] and layers == {"0", "1"}  # the resumed report keeps layer 0's rows


def test_cli_quantizes_the_bundled_model_with_auto(tmp_path, capsys, small_calib):
    """From the folder (experts read lazily, layer by layer): plan, quantize, reload; the closing table counts
    the attention in the bits."""
    from moequant.cli.main import main

    out = tmp_path / "q"
    rc = main(["quantize", "--non-expert", "auto", "--bits", "3.0", "--calib", str(small_calib),
               "--samples", "16", "--seq-len", "64", "--quiet", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert "bits / planned weight" in printed and "non-expert Linears per width" in printed
    plan = Plan.load(out / "plan.json")
    assert len(plan.linears) == 16 and 2.9 < plan.average_bits() <= 3.0  # 4 layers x q/k/v/o
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    quantized = [n for n, lin in plan.linears.items() if lin.spec.method.is_integer]
    assert quantized and all(isinstance(loaded.get_submodule(n), QuantLinear) for n in quantized)
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()
