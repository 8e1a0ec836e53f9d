"""--target vllm: the exact knapsack over layers (one symmetric 4- or 8-bit width per MoE layer), written as
compressed-tensors (by default) or GPTQ with a per-layer `dynamic` map, and as moequant's format of the same plan."""

import itertools
import json

import numpy as np
import pytest

from moequant.config import Method
from moequant.plan.config import Budget, PlanConfig, Target
from moequant.plan.damage import DamageTable
from moequant.plan.knapsack import solve
from moequant.plan.schema import expert_nbytes


def _table(layers=6, experts=5, seed=0):
    config = PlanConfig(budget=Budget(bits=6.0), widths=(4, 8), sym=True, target=Target.VLLM, group_size=32)
    rng = np.random.default_rng(seed)
    keys = [(i, e) for i in range(layers) for e in range(experts)]
    d8 = rng.random(len(keys)) * 0.1
    damage = np.stack([d8 * (4 + 30 * rng.random(len(keys))), d8], axis=1)  # [n, 2]: 4-bit worse
    return DamageTable("mixtral", keys, damage, config, 64, 128, 0), config


def test_per_layer_plan_is_the_exact_optimum():
    table, config = _table()
    hidden, inter = table.hidden, table.intermediate
    bytes_at = {s.bits: expert_nbytes(s, hidden, inter) for s in config.columns()}  # the 4- and 8-bit columns
    n_params = len(table.keys) * 3 * hidden * inter
    for bits in (4.5, 5.5, 6.5, 7.5):
        plan = solve(table, Budget(bits=bits))
        assert all(len({s.bits for s in layer}) == 1 for layer in plan.layers.values())
        assert all(s.sym and s.method is Method.GPTQ for layer in plan.layers.values() for s in layer)
        got = {i: layer[0].bits for i, layer in plan.layers.items()}
        # brute force over every assignment of {4, 8} to the 6 layers
        best, best_damage = None, np.inf
        for combo in itertools.product((0, 1), repeat=6):
            size = sum(bytes_at[(4, 8)[c]] * 5 for c in combo)
            if size > bits * n_params / 8:
                continue
            dmg = sum(table.damage[i * 5 : i * 5 + 5, c].sum() for i, c in enumerate(combo))
            if dmg < best_damage:
                best, best_damage = {i: (4, 8)[c] for i, c in enumerate(combo)}, dmg
        assert got == best, (bits, got, best)
        assert plan.estimate["damage"] == pytest.approx(best_damage)
        assert plan.total_expert_bytes() <= bits * n_params / 8
    mixed = {layer[0].bits for layer in solve(table, Budget(bits=5.5)).layers.values()}
    assert mixed == {4, 8}


def test_cli_target_vllm_writes_mixed_gptq_and_moequant(tmp_path, small_calib):
    """--format gptq with layers at 4 and 8 bits only with --allow-mixed-gptq (vllm#41955)."""
    from safetensors import safe_open

    from moequant.cli.main import main

    out = tmp_path / "v"
    rc = main(["quantize", "--target", "vllm", "--bits", "5.5", "--method", "rtn", "--group-size", "32",
               "--format", "gptq", "--allow-mixed-gptq", "--calib", str(small_calib),
               "--samples", "8", "--seq-len", "64", "--no-layer-probe", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] is True and qc["bits"] == 4
    overrides = {k: v for k, v in qc["dynamic"].items() if k.startswith("+:")}
    assert overrides and all(v == {"bits": 8} for v in overrides.values())
    mq = json.loads((tmp_path / "v.moequant" / "config.json").read_text())["quantization_config"]
    layer_bits = {i: {w.split(":")[1] for w in ws} for i, ws in mq["experts"].items()}
    assert all(len(b) == 1 for b in layer_bits.values())
    assert {b.pop() for b in layer_bits.values()} == {"4", "8"}
    # the GPTQ tensors of an 8-bit layer are 8-bit: qweight packs 4 codes a word along K
    layer8 = next(int(i) for i, ws in mq["experts"].items() if ws[0].endswith(":8"))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if f"layers.{layer8}." in k and k.endswith("experts.0.w1.qweight"))
    with safe_open(str(out / index[key]), framework="pt") as f:
        qweight = f.get_tensor(key)
    assert qweight.shape[0] == 128 // 4  # hidden 128, 8 bits


def test_cli_target_vllm_refuses_conflicts(tmp_path, capsys):
    from moequant.cli.main import main

    assert main(["quantize", "--target", "vllm", "--asym", "--out", str(tmp_path / "a")]) == 2
    assert "drop --asym" in capsys.readouterr().err
    assert main(["quantize", "--target", "vllm", "--format", "moequant", "--out", str(tmp_path / "b")]) == 2
    assert "drop --format moequant" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_export_refusals_come_first(tmp_path, capsys):
    from moequant.cli.main import main

    assert main(["quantize", "--target", "vllm", "--out", str(tmp_path / "a")]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                "--format",
                "gptq",
                "--bits",
                "5",
                "--non-expert",
                "rtn:8",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "routed experts only" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_target_vllm_writes_compressed_tensors_by_default(tmp_path, capsys, small_calib):
    """--target vllm's default format is compressed-tensors (int4 and int8 MoE groups load in vLLM,
    vllm-project/vllm#47154); export-gptq of the mixed-width moequant folder is refused with the reason, and
    written with --allow-mixed-gptq."""
    from moequant.cli.main import main

    out = tmp_path / "v"
    rc = main(["quantize", "--target", "vllm", "--bits", "5.5", "--method", "rtn", "--group-size", "32",
               "--calib", str(small_calib), "--samples", "8", "--seq-len", "64", "--no-layer-probe",
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == {4, 8}
    capsys.readouterr()
    assert main(["export-gptq", str(tmp_path / "v.moequant"), str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "41955" in err and "--allow-mixed-gptq" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()
    assert main(["export-gptq", str(tmp_path / "v.moequant"), str(tmp_path / "g"), "--allow-mixed-gptq"]) == 0
    assert (
        json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "gptq"
    )


def test_cli_mixed_gptq_refused_before_any_pass(tmp_path, capsys, small_calib):
    """--format gptq of a --target vllm budget whose plan puts layers at 4 and 8 bits (refused once planned,
    before quantizing), or of a mixed-width plan file (before the model is read): one line, exit 2, nothing
    written."""
    from moequant.cli.main import main
    from moequant.config import Method, QuantSpec

    rc = main(["quantize", "--target", "vllm", "--bits", "5.5", "--format", "gptq", "--out", str(tmp_path / "a"),
               "--calib", str(small_calib), "--samples", "16", "--seq-len", "64", "--no-layer-probe",
               "--quiet"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "41955" in err and "--allow-mixed-gptq" in err and len(err.strip().splitlines()) == 1
    assert not any(p.name.startswith("a") for p in tmp_path.iterdir())
    from moequant import api

    plan = api.make_uniform_plan(None, QuantSpec(Method.RTN, 4, 32, sym=True))
    plan.layers[0] = [QuantSpec(Method.RTN, 8, 32, sym=True)] * len(plan.layers[0])
    plan.save(tmp_path / "mixed.json")
    rc = main(
        ["quantize", "--plan", str(tmp_path / "mixed.json"), "--format", "gptq", "--out", str(tmp_path / "b")]
    )
    assert rc == 2
    assert "41955" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.moequant.partial").exists()
