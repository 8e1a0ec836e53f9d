"""GPTQ v1 export: keys in the family's disk naming, an independent v1 dequantizer agrees, clear refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moequant  # noqa: F401
from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.checkpoint.export_gptq import ExportError, check_exportable, export_gptq
from moequant.config import Method, QuantizeConfig, QuantSpec

QCFG = QuantizeConfig(progress=False, batch_size=4, min_tokens=4)


def _data():
    g = torch.Generator().manual_seed(0)
    return CalibData(torch.randint(0, 256, (8, 32), generator=g), ["x"] * 8, "random ids")


def _unpack_v1(q: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Independent GPTQ-v1 unpacking: 32/bits codes per int32 word, LSB first, along `axis`."""
    per = 32 // bits
    w = q.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if axis == 0:  # [Kw, N] -> [Kw*per, N]
        codes = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, q.shape[1])
    codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [G, Nw, per]
    return codes.reshape(q.shape[0], -1)


def _dequant_v1(t: dict, prefix: str, bits: int) -> torch.Tensor:
    q = _unpack_v1(t[f"{prefix}.qweight"], bits, 0).double()  # [K, N]
    z = _unpack_v1(t[f"{prefix}.qzeros"], bits, 1).double() + 1  # [G, N] (v1 stores zero - 1)
    s = t[f"{prefix}.scales"].double()  # [G, N]
    g = t[f"{prefix}.g_idx"].long()  # [K]
    return ((q - z[g]) * s[g]).T  # [N, K]


def test_export_matches_moequant_dequantization(tmp_path):
    model = tiny_model("mixtral", seed=3)
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32, sym=True))
    plan.layers[1] = [QuantSpec(Method.GPTQ, 8, 32, sym=True)] * 8  # layers may differ
    api.quantize(model, plan, _data(), tmp_path / "mq", QCFG, save_dtype=torch.float32)
    with pytest.raises(ExportError, match="vllm#41955"):  # mixed widths only when asked
        export_gptq(tmp_path / "mq", tmp_path / "gptq")
    out = export_gptq(tmp_path / "mq", tmp_path / "gptq", allow_mixed=True)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] in (4, 8) and cfg["sym"] and cfg["group_size"] == 32
    assert any(k.startswith("-:") for k in cfg["dynamic"])
    assert len([k for k in cfg["dynamic"] if k.startswith("+:")]) == 1
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors |= load_file(f)
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors  # Mixtral's on-disk naming
    assert not any(".mlp." in k for k in tensors)
    inter = model.config.intermediate_size
    for i, bits in ((0, 4), (1, 8)):
        qe = model.model.layers[i].mlp.experts
        for e in range(8):
            base = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            gu = qe.slot(e).gate_up.dequantize(torch.float64)
            assert torch.equal(_dequant_v1(tensors, f"{base}.w1", bits), gu[:inter])
            assert torch.equal(_dequant_v1(tensors, f"{base}.w3", bits), gu[inter:])
            assert torch.equal(
                _dequant_v1(tensors, f"{base}.w2", bits), qe.slot(e).down.dequantize(torch.float64)
            )


def test_transformers_key_names_hold_the_same_tensors(tmp_path):
    """names="transformers" (what GPTQModel 7.6 reads): the same tensors under per-expert gate/up/down_proj
    names of transformers 5's modules; non-expert tensors under the model's names."""
    model = tiny_model("mixtral", seed=4)
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32, sym=True))
    api.quantize(model, plan, _data(), tmp_path / "mq", QCFG, save_dtype=torch.float32)
    load = lambda d: {k: v for f in d.glob("*.safetensors") for k, v in load_file(f).items()}  # noqa: E731
    published = load(export_gptq(tmp_path / "mq", tmp_path / "pub"))
    hf = load(export_gptq(tmp_path / "mq", tmp_path / "hf", names="transformers"))
    assert len(hf) == len(published)
    rename = {
        ".w1.": ".gate_proj.",
        ".w3.": ".up_proj.",
        ".w2.": ".down_proj.",
        ".block_sparse_moe.": ".mlp.",
    }
    for k, v in published.items():
        new = k
        for a, b in rename.items():
            new = new.replace(a, b)
        assert torch.equal(hf[new], v), k
    with pytest.raises(ExportError, match="unknown key names"):
        export_gptq(tmp_path / "mq", tmp_path / "bad", names="vllm")


def test_refusals_say_why():
    sym4 = QuantSpec(Method.GPTQ, 4, 32, sym=True)
    with pytest.raises(ExportError, match="asymmetric"):
        check_exportable("mixtral", {0: [QuantSpec(Method.GPTQ, 4, 32)] * 8})
    with pytest.raises(ExportError, match="mixes"):
        check_exportable("mixtral", {0: [sym4] * 7 + [QuantSpec(Method.GPTQ, 8, 32, sym=True)]})
    with pytest.raises(ExportError, match="gptq:3"):
        check_exportable("qwen3_moe", {0: [QuantSpec(Method.GPTQ, 3, 32, sym=True)] * 8})
    with pytest.raises(ExportError, match="fused experts"):
        check_exportable("gpt_oss", {0: [sym4] * 8})
    with pytest.raises(ExportError, match="keep"):
        check_exportable("olmoe", {0: [sym4] * 7 + [QuantSpec(Method.KEEP, 16)]})
    assert check_exportable("olmoe", {0: [sym4] * 8, 1: [sym4] * 8}) == (4, 32, {0: 4, 1: 4})


def test_cli_refuses_before_quantizing(tmp_path, capsys):
    from moequant.cli.main import main

    rc = main(
        [
            "quantize",
            "--uniform",
            "--bits",
            "3",
            "--format",
            "gptq",
            "--samples",
            "4",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "symmetric 4 or 8 bits" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_gptq_format_chooses_symmetric_grids(tmp_path, small_calib):
    """--format gptq without --sym quantizes on symmetric grids and exports; an explicit --asym is refused."""
    from moequant.cli.main import main

    out = tmp_path / "g"
    rc = main(["quantize", "--uniform", "--bits", "4", "--method", "rtn", "--group-size", "32", "--format", "gptq",
               "--calib", str(small_calib), "--samples", "4", "--seq-len", "32", "--out", str(out),
               "--quiet"])  # fmt: skip
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["sym"] is True and cfg["bits"] == 4
    assert not (tmp_path / "g.moequant").exists()


def test_cli_gptq_format_refuses_explicit_asym(tmp_path, capsys):
    from moequant.cli.main import main

    rc = main(["quantize", "--uniform", "--bits", "4", "--asym", "--format", "gptq", "--samples", "4",
               "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "drop --asym" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
