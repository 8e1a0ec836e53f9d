"""Published pre-quantized checkpoints (FP8 block-scaled, MXFP4) read dequantized, against transformers' own
dequantization of the same files, and quantized to the same bytes as the 16-bit model it dequantizes to."""

import json

import pytest
import torch
from published_fixtures import _fp8_blockwise, _mxfp4, write_fp8, write_mxfp4
from safetensors.torch import load_file

from moequant.arch.tiny import save_tiny
from moequant.calibration.data import CalibData
from moequant.checkpoint.published import dequantize_fp8_blocks, dequantize_mxfp4
from moequant.checkpoint.source import open_source
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.errors import CheckpointError
from moequant.plan.planner import make_uniform_plan
from moequant.quantize.run import quantize


def test_fp8_blocks_ragged_edges_and_orientation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 50, generator=g)
    q, s = _fp8_blockwise(w, (32, 16))  # 3 x 4 blocks, the last row and column partial
    got = dequantize_fp8_blocks(q, s, (32, 16))
    want = torch.empty(70, 50)
    for i in range(70):
        for j in range(50):
            want[i, j] = q[i, j].float() * s[i // 32, j // 16]
    assert torch.equal(got, want)
    assert (got - w).norm() / w.norm() < 0.05  # e4m3 keeps about 2 significant bits... and the scale
    with pytest.raises(CheckpointError, match="expected"):
        dequantize_fp8_blocks(q, s.T, (32, 16))  # a transposed scale grid is refused, not broadcast


def test_mxfp4_codes_nibble_order_and_scale():
    # one group of 32 values that e2m1 x 2^1 represents exactly, so the round trip must be exact
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4) * 2.0
    vals[1::2] *= -1
    blocks, scales = _mxfp4(vals[None])  # [1, 1, 16], [1, 1]
    assert int(scales[0, 0]) == 128  # 2^(128 - 127)
    assert int(blocks[0, 0, 0]) & 0x0F == 0 and int(blocks[0, 0, 0]) >> 4 == 0b1001  # 0.0 low, -1.0 high
    assert torch.equal(dequantize_mxfp4(blocks, scales)[0], vals)


def _ref_state(folder, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    return model, model.state_dict()


def _source_tensors(folder) -> dict[str, torch.Tensor]:
    """Every model tensor as moequant's streamed source reads it (experts chunk by chunk)."""
    src = open_source(str(folder), lazy_experts=True)
    out = {n: p.clone() for n, p in src.model.state_dict().items() if p.device.type != "meta"}
    for i in range(len(src.model.model.layers)):
        layer = src.load_layer(i)
        prefix = f"model.layers.{i}."
        out |= {prefix + n: p.clone() for n, p in layer.state_dict().items() if p.device.type != "meta"}
        for ref in src.blocks:
            if ref.layer_idx == i:
                n_exp = ref.experts.down_proj.shape[0]
                chunks = [src.read_experts(i, [e, e + 1]) for e in range(0, n_exp, 2)]  # 2 experts a read
                for name in chunks[0]:
                    out[f"{prefix}mlp.experts.{name}"] = torch.cat([c[name] for c in chunks])
        src.release_layer(i)
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    save_tiny("deepseek_v3", root / "ds-bf16", seed=0, dtype=torch.bfloat16)
    write_fp8(root / "ds-bf16", root / "ds-fp8", block=(8, 16))  # non-square blocks: a transpose shows
    save_tiny("gpt_oss", root / "oss-bf16", seed=0, dtype=torch.bfloat16)
    write_mxfp4(root / "oss-bf16", root / "oss-mxfp4")
    return root


@pytest.mark.parametrize("name", ["ds-fp8", "oss-mxfp4"])
def test_reads_what_transformers_dequantizes(fixtures, name):
    from transformers import Mxfp4Config

    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if "mxfp4" in name else {}
    _, ref = _ref_state(fixtures / name, **kw)
    got = _source_tensors(fixtures / name)
    assert set(got) == set(ref)
    for n, v in got.items():
        assert v.shape == ref[n].shape, n
        torch.testing.assert_close(v.float(), ref[n].float(), rtol=0, atol=0, msg=n)
    packed = "model.layers.0.mlp.experts.gate_up_proj"
    if "mxfp4" in name:
        # and it is the 16-bit model up to e2m1's rounding: the transpose and nibble order are right
        bf16 = load_file(str(fixtures / "oss-bf16" / "model.safetensors"))[packed].float()
        assert (got[packed] - bf16).norm() / bf16.norm() < 0.2


def _quantize(folder, out, data):
    plan = make_uniform_plan(str(folder), QuantSpec(Method.RTN, 4, 32))
    quantize(str(folder), plan, data, out, QuantizeConfig(progress=False, batch_size=4, min_tokens=1))


@pytest.mark.parametrize("name, bf16", [("ds-fp8", "ds-bf16"), ("oss-mxfp4", "oss-bf16")])
def test_quantizes_to_the_bytes_of_its_dequantized_model(fixtures, tmp_path, name, bf16):
    """Quantizing the published checkpoint directly == quantizing the float32 model transformers dequantizes
    from it (saved with the checkpoint's 16-bit dtype in its config, as the FP8 / MXFP4 source is)."""
    from transformers import Mxfp4Config

    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if "mxfp4" in name else {}
    model, _ = _ref_state(fixtures / name, **kw)
    ref_dir = tmp_path / "dequantized"
    model.save_pretrained(ref_dir)
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    for f in (fixtures / bf16).glob("tokenizer*"):
        (ref_dir / f.name).write_bytes(f.read_bytes())

    g = torch.Generator().manual_seed(0)
    data = CalibData(torch.randint(0, 256, (8, 32), generator=g), ["random"] * 8, "random token ids")
    _quantize(fixtures / name, tmp_path / "direct", data)
    _quantize(ref_dir, tmp_path / "via-ref", data)
    shards = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert len(shards) >= 3  # model-base and one shard a layer
    assert shards == sorted(p.name for p in (tmp_path / "via-ref").glob("*.safetensors"))
    for shard in shards:
        a, b = load_file(str(tmp_path / "direct" / shard)), load_file(str(tmp_path / "via-ref" / shard))
        assert a.keys() == b.keys(), shard
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (shard, k)
    out_cfg = json.loads((tmp_path / "direct" / "config.json").read_text())
    assert out_cfg["quantization_config"]["quant_method"] == "moequant"  # the source's fp8 / mxfp4 is gone
    assert out_cfg["dtype"] == "bfloat16"


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_prequantized_sources_are_refused_by_name(fixtures, tmp_path, method):
    folder = tmp_path / method
    folder.mkdir()
    cfg = json.loads((fixtures / "ds-bf16" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((fixtures / "ds-bf16" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=f"already quantized with '{method}'"):
        open_source(str(folder))
