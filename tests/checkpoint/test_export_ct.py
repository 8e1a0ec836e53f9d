"""compressed-tensors export: written and read back by the compressed-tensors library itself.

A tiny Mixtral is quantized with one symmetric width per layer (4 and 8 bits), exported, and decompressed by
the library (PackedQuantizationCompressor.decompress, its config groups matched by its own name matching):
the weights equal moequant's, bit for bit with float32 scales and as the library's float16 arithmetic
rounds them with float16 scales; the model transformers builds from the decompressed weights gives
moequant's logits.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moequant  # noqa: F401
from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.checkpoint.export_ct import (
    decompressed_state_dict,
    export_compressed_tensors,
    scheme_for,
)
from moequant.checkpoint.export_gptq import ExportError
from moequant.checkpoint.loading import load_model
from moequant.config import Method, QuantizeConfig, QuantSpec

QCFG = QuantizeConfig(progress=False, min_tokens=0)


def load_decompressed(path: str | Path, work: str | Path, dtype=torch.float32):
    """A transformers model of a compressed-tensors MoE folder, its weights decompressed by the library.

    transformers' own compressed-tensors loader matches config groups against nn.Linear modules, and
    transformers 5 fuses the experts into 3-D parameters, so it finds no expert module to decompress
    ("Could not match ... in instance of ...ForCausalLM") and loads the experts uninitialised. Instead: the
    library decompresses every packed module (decompressed_state_dict), the result is saved under the
    published per-expert names in `work` without a quantization_config, and transformers' from_pretrained
    fuses it through its conversion mapping, as for any published per-expert checkpoint."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path, work = Path(path), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in decompressed_state_dict(path).items()}, str(work / "model.safetensors")
    )
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (work / "config.json").write_text(json.dumps(cfg, indent=1))
    return AutoModelForCausalLM.from_pretrained(work, dtype=dtype).eval()


def _quantized(tmp_path, layer_bits=(4, 8), sym=True, seed=5):
    model = tiny_model("mixtral", seed=seed)
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32, sym=sym))
    for i, b in enumerate(layer_bits):
        plan.layers[i] = [QuantSpec(Method.GPTQ, b, 32, sym=sym)] * len(plan.layers[i])
    g = torch.Generator().manual_seed(0)
    data = CalibData(torch.randint(0, 256, (8, 32), generator=g), ["x"] * 8, "random ids")
    api.quantize(model, plan, data, tmp_path / "mq", QCFG, save_dtype=torch.float32)
    return tmp_path / "mq"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct")
    src = _quantized(tmp)
    return (
        src,
        export_compressed_tensors(src, tmp / "ct16"),
        export_compressed_tensors(src, tmp / "ct32", scale_dtype=torch.float32),
    )


def test_config_is_the_librarys_and_targets_experts_per_layer(exported):
    from compressed_tensors.quantization import QuantizationConfig

    _, ct16, _ = exported
    qc = json.loads((ct16 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    parsed = QuantizationConfig.model_validate(qc)
    assert {g.weights.num_bits for g in parsed.config_groups.values()} == {4, 8}
    assert all(g.weights.symmetric and g.weights.group_size == 32 for g in parsed.config_groups.values())
    assert scheme_for("model.layers.0.block_sparse_moe.experts.3.w1", qc).weights.num_bits == 4
    assert scheme_for("model.layers.1.block_sparse_moe.experts.3.w2", qc).weights.num_bits == 8
    assert scheme_for("model.layers.0.self_attn.q_proj", qc) is None
    assert scheme_for("model.layers.0.block_sparse_moe.gate", qc) is None
    tensors = {k: v for f in ct16.glob("*.safetensors") for k, v in load_file(f).items()}
    packed = tensors["model.layers.1.block_sparse_moe.experts.0.w2.weight_packed"]
    shape = tensors["model.layers.1.block_sparse_moe.experts.0.w2.weight_shape"]
    assert packed.dtype == torch.int32 and packed.shape[1] * 32 == shape[1] * 8  # 8 bits, packed along K
    assert not any(k.endswith("weight_zero_point") for k in tensors)  # symmetric: no zero points
    assert tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight_scale"].dtype == torch.float16


def test_library_decompression_gives_moequants_weights(exported):
    src, ct16, ct32 = exported
    model = load_model(str(src))
    d16, d32 = decompressed_state_dict(ct16), decompressed_state_dict(ct32)
    for i in (0, 1):
        qe = model.model.layers[i].mlp.experts
        inter = qe.intermediate
        for e in range(qe.num_experts):
            gu = qe.slot(e).gate_up.dequantize(torch.float32)  # [2I, H]
            dn = qe.slot(e).down.dequantize(torch.float32)  # [H, I]
            base = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            for name, want in ((f"{base}.w1.weight", gu[:inter]), (f"{base}.w3.weight", gu[inter:]),
                               (f"{base}.w2.weight", dn)):  # fmt: skip
                assert torch.equal(d32[name], want), name
                assert torch.equal(d16[name], want.half().float()), name  # the library multiplies in float16


def test_transformers_model_of_the_decompressed_export_gives_moequants_logits(exported, tmp_path):
    src, _, ct32 = exported
    ours = load_model(str(src))
    theirs = load_decompressed(ct32, tmp_path / "dec")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_refusals(tmp_path):
    asym = _quantized(tmp_path / "a", sym=False)
    with pytest.raises(ExportError, match="asymmetric"):
        export_compressed_tensors(asym, tmp_path / "a-out")
    with pytest.raises(ExportError, match="float16 or float32"):
        export_compressed_tensors(asym, tmp_path / "b-out", scale_dtype=torch.bfloat16)
    assert not (tmp_path / "a-out").exists() and not (tmp_path / "b-out").exists()


def test_class_target_linear_as_llm_compressor_writes_it(exported, tmp_path):
    """llm-compressor's config group targets the class "Linear" and lists what it skipped in `ignore`: the same
    folder with its groups rewritten that way decompresses to the same weights; an ignored name matches nothing."""
    import shutil

    _, ct16, _ = exported
    folder = tmp_path / "linear-target"
    shutil.copytree(ct16, folder)
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    four = next(g for g in qc["config_groups"].values() if g["weights"]["num_bits"] == 4)
    keys = [k for f in folder.glob("*.safetensors") for k in load_file(f)]
    layer1 = [k.removesuffix("_packed") for k in keys if k.endswith(".weight_packed") and ".layers.1." in k]
    # one group for every Linear at 4 bits: layer 1's (8-bit) modules must then decompress differently
    qc["config_groups"] = {"group_0": four | {"targets": ["Linear"]}}
    qc["ignore"] = ["lm_head", "re:.*block_sparse_moe.gate$"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert scheme_for("model.layers.0.block_sparse_moe.experts.3.w1", qc) is None  # by name: no target
    assert scheme_for("model.layers.0.block_sparse_moe.experts.3.w1", qc, linear=True).weights.num_bits == 4
    assert scheme_for("model.layers.0.block_sparse_moe.gate", qc, linear=True) is None  # ignored
    want, got = decompressed_state_dict(ct16), decompressed_state_dict(folder)
    assert set(want) == set(got)
    layer0 = [k for k in want if ".layers.0.block_sparse_moe.experts." in k]
    assert layer0 and all(torch.equal(want[k], got[k]) for k in layer0)
    assert layer1 and not torch.equal(want[layer1[0]], got[layer1[0]])
