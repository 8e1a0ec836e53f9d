"""`import moequant` + from_pretrained on a compressed-tensors MoE export: loads the experts right (moequant's
own logits), or refuses a scheme it cannot convert; never the silent wrong model transformers' own loader
makes of per-expert groups under fused experts (the bundled model: perplexity 3505 for 61.75,
evals/results/bench_ct_transformers.md)."""

import json
import subprocess
import sys

import pytest
import torch

import moequant  # noqa: F401
from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.checkpoint.ct_loading import expert_schemes
from moequant.checkpoint.export_ct import export_compressed_tensors
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.errors import CheckpointError

CHILD = """
import json, sys, torch
first, ct, mq, dtype = sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
import moequant
from transformers import AutoModelForCausalLM
ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
order = (ct, mq) if first == "ct" else (mq, ct)
logits = {}
for path in order:  # the compressed-tensors folder first in a fresh process (nothing cached)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    kinds = sorted({type(l.mlp.experts).__name__ for l in model.model.layers})
    with torch.no_grad():
        logits[path] = (model(input_ids=ids).logits.float(), kinds)
(a, ka), (b, kb) = logits[ct], logits[mq]
print(json.dumps({"rel": ((a - b).norm() / b.norm()).item(), "kinds": ka, "finite": bool(torch.isfinite(a).all())}))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctload")
    model = tiny_model("mixtral", seed=7)
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32, sym=True))
    plan.layers[0] = [QuantSpec(Method.GPTQ, 8, 32, sym=True)] * len(plan.layers[0])  # 8-bit and 4-bit layers
    g = torch.Generator().manual_seed(0)
    data = CalibData(torch.randint(0, 256, (8, 32), generator=g), ["x"] * 8, "random ids")
    api.quantize(
        model, plan, data, tmp / "mq", QuantizeConfig(progress=False, min_tokens=0), save_dtype=torch.float32
    )
    return tmp / "mq", export_compressed_tensors(tmp / "mq", tmp / "ct")


def _child(first: str, ct, mq, dtype: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, first, str(ct), str(mq), dtype], capture_output=True, text=True, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_from_pretrained_gives_moequants_logits_in_a_fresh_process(folders):
    """float32: the same codes and scales, the same reference arithmetic: equal logits. On the code before
    ct_loading, the fused experts stayed as initialised (relative error of order 1)."""
    mq, ct = folders
    got = _child("ct", ct, mq, "float32")
    assert got["kinds"] == ["QuantizedExperts"] and got["finite"]
    assert got["rel"] < 1e-6


def test_bfloat16_first_load(folders):
    mq, ct = folders
    got = _child("ct", ct, mq, "bfloat16")
    assert got["kinds"] == ["QuantizedExperts"] and got["finite"]
    assert got["rel"] < 1e-2  # both loads in bf16; the experts' arithmetic is the same reference path


def _edit(ct, tmp_path, change) -> str:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(ct, out)
    cfg = json.loads((out / "config.json").read_text())
    change(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda q: q["config_groups"]["group_8bit"]["weights"].update(num_bits=3), "int4 / int8"),
        (lambda q: q["config_groups"]["group_8bit"]["weights"].update(symmetric=False), "asymmetric"),
        (lambda q: q["config_groups"]["group_8bit"].update(input_activations=q["config_groups"]["group_8bit"]["weights"]),
         "activation quantization"),
    ],
)  # fmt: skip
def test_schemes_it_cannot_convert_are_refused_with_what_reads_them(folders, tmp_path, change, why):
    from transformers import AutoModelForCausalLM

    _, ct = folders
    path = _edit(ct, tmp_path, change)
    with pytest.raises(CheckpointError, match=why) as err:
        AutoModelForCausalLM.from_pretrained(path)
    assert "vllm serve" in str(err.value)


def test_groups_that_miss_the_experts_leave_transformers_path_alone(folders):
    """A config whose groups target no expert (attention only): no layer taken over."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    _, ct = folders
    q = json.loads((ct / "config.json").read_text())["quantization_config"]
    for g in q["config_groups"].values():
        g["targets"] = [r"re:.*self_attn\.q_proj$"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ct))
    assert expert_schemes(model, QuantizationConfig.model_validate(q)) == {}
    q["config_groups"]["group_4bit"]["targets"] = [
        "Linear"
    ]  # llm-compressor's usual target: experts were Linear
    q["ignore"] = ["lm_head", r"re:.*block_sparse_moe\.gate$"]
    assert set(expert_schemes(model, QuantizationConfig.model_validate(q))) == {0, 1}
