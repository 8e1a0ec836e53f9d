"""Each export writes its own model card (what it holds, how vLLM / GPTQModel / transformers load it, what does
not read it) and carries the tokenizer; the source's moequant card (`import moequant`, the source folder) is not
copied."""

import shutil

import pytest
import torch

from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.checkpoint.bundled import bundled_model_path
from moequant.checkpoint.export_card import kept_modules
from moequant.checkpoint.export_ct import export_compressed_tensors
from moequant.checkpoint.export_gptq import export_gptq
from moequant.config import Method, QuantizeConfig, QuantSpec

TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    model = tiny_model("mixtral", seed=2)
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32, sym=True))
    plan.layers[1] = [QuantSpec(Method.RTN, 8, 32, sym=True)] * len(plan.layers[1])
    data = CalibData(
        torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 4, "ids"
    )
    out = tmp / "mq"
    api.quantize(model, plan, data, out, QuantizeConfig(progress=False, min_tokens=0))
    for f in TOKENIZER:  # the folder a CLI run writes holds the tokenizer
        shutil.copy(bundled_model_path() / f, out / f)
    (out / "README.md").write_text(
        "# moequant card\n\n```python\nimport moequant\n```\n"
    )  # the source's card
    return out


def _check_common(out, card: str) -> None:
    assert "# moequant card" not in card  # its own card, not the source's
    for f in TOKENIZER:
        assert (out / f).is_file(), f
    assert "vllm serve DIR" in card and 'LLM("DIR")' in card
    assert "| 0 | int4, symmetric, group 32 |" in card and "| 1 | int8, symmetric, group 32 |" in card
    assert "`model.layers.*.self_attn.q_proj`" in card and "`model.layers.*.block_sparse_moe.gate`" in card
    assert "`lm_head`" in card and "`model.embed_tokens`" in card
    assert "experts" not in "".join(line for line in card.splitlines() if line.startswith("- `model."))
    assert "Tokenizer: included." in card
    assert "## What does not read it" in card


def test_gptq_card(src, tmp_path):
    out = export_gptq(src, tmp_path / "g", allow_mixed=True)
    card = (out / "README.md").read_text()
    _check_common(out, card)
    assert "GPTQ v1" in card and "dynamic" in card
    assert "vllm#41955" in card  # mixed widths: vLLM's Marlin MoE crash is named
    assert "GPTQModel** (7.6) refuses" in card and "--names transformers" in card
    assert "import moequant` does not load GPTQ" in card
    hf = export_gptq(src, tmp_path / "hf", allow_mixed=True, names="transformers")
    assert 'GPTQModel.load("DIR")' in (hf / "README.md").read_text()


def test_compressed_tensors_card(src, tmp_path):
    out = export_compressed_tensors(src, tmp_path / "ct")
    card = (out / "README.md").read_text()
    _check_common(out, card)
    assert "compressed-tensors pack-quantized" in card and "vllm#47154" in card
    assert "`import moequant` first" in card and "loads this folder wrong" in card
    assert "41955" not in card


def test_kept_modules_folds_layers_and_skips_experts():
    keys = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.mlp.experts.3.gate_proj.qweight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert kept_modules(keys, "model.layers", ".experts.") == (
        "lm_head",
        "model.layers.*.mlp.shared_experts.gate_proj",
        "model.layers.*.self_attn.q_proj",
        "model.norm",
    )
