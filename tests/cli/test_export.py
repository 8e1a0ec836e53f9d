"""`moequant export-gptq` / `export-compressed-tensors`: a symmetric 4-bit moequant folder converted by the
commands, an existing output refused without --overwrite."""

import json

import pytest
from safetensors import safe_open

import moequant  # noqa: F401
from moequant.cli.main import main


@pytest.fixture(scope="module")
def folder(sym4_mixtral):
    return sym4_mixtral  # tests/conftest.py


def _quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_export_gptq(folder, tmp_path, capsys):
    out = tmp_path / "gptq"
    assert main(["export-gptq", str(folder), str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"exported GPTQ v1 checkpoint -> {out}"
    cfg = _quantization_config(out)
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"]) == ("gptq", 4, 32, True)
    assert main(["export-gptq", str(folder), str(out), "--quiet"]) == 2  # out exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moequant export-gptq: error: ") and "--overwrite" in err[0]
    assert main(["export-gptq", str(folder), str(out), "--overwrite", "--quiet"]) == 0


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_export_compressed_tensors_with_its_scale_dtype(folder, tmp_path, capsys, scale_dtype):
    out = tmp_path / "ct"
    argv = ["export-compressed-tensors", str(folder), str(out), "--scale-dtype", scale_dtype, "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"exported compressed-tensors checkpoint -> {out}"
    assert _quantization_config(out)["quant_method"] == "compressed-tensors"
    dtypes = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("weight_scale")}
    assert dtypes == {"F16" if scale_dtype == "float16" else "F32"}
