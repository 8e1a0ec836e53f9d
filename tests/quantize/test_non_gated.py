"""Experts without a gate projection (Nemotron-H: `up_proj [E, I, H]` alone, relu2), end to end.

A tiny Nemotron-H built with transformers' own classes and saved in bfloat16 derives Activation.RELU2; it is
quantized from the folder (streamed, through transformers' conversion mapping) at 8-bit RTN and 4-bit GPTQ,
each expert's input projection is stored with I rows (not 2I), and each checkpoint is loaded with
`from_pretrained` in bfloat16 first in a fresh process: its logits against the 16-bit model's (also bf16).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    import moequant
    from moequant.modules.qexperts import QuantizedExperts

    src, outs = sys.argv[1], sys.argv[2:]
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))  # fresh ids
    result = {}
    for out in outs:  # each quantized folder first, in bfloat16 (the checkpoint's dtype)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        qes = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        result[out] = {"logits": logits.tolist(), "experts": len(qes),
                       "activations": sorted({q.activation.value for q in qes})}
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        result["16-bit"] = {"logits": base(input_ids=ids).logits.float().tolist()}
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(source folder, {name: quantized folder}, model) of a tiny bf16 Nemotron-H at 8-bit RTN and 4-bit GPTQ."""
    from helpers import random_calib

    from moequant import api
    from moequant.arch.tiny import save_tiny
    from moequant.config import Method, QuantizeConfig, QuantSpec

    root = tmp_path_factory.mktemp("nemotron_h")
    src = root / "bf16"
    model = save_tiny("nemotron_h", src, seed=0, dtype=torch.bfloat16)
    outs = {}
    for name, spec in (("rtn8", QuantSpec(Method.RTN, 8, 32)), ("gptq4", QuantSpec(Method.GPTQ, 4, 32))):
        plan = api.make_uniform_plan(str(src), spec)
        config = QuantizeConfig(progress=False, batch_size=4, min_tokens=1)
        api.quantize(str(src), plan, random_calib(n=16), root / name, config)
        outs[name] = root / name
    return src, outs, model


def test_nemotron_h_derives_relu2_on_up_alone(quantized):
    from moequant.arch import Activation, get_arch, moe_blocks

    _, _, model = quantized
    arch = get_arch(model)
    assert arch.activation is Activation.RELU2
    assert arch.in_proj == "up_proj"
    ref = moe_blocks(model, arch)[0]
    w = arch.expert_weights(ref.experts)
    E, I, H = ref.experts.up_proj.shape
    assert w.gate_up.shape == (E, I, H) and w.in_rows == I == w.intermediate
    assert torch.equal(w.gate_up, ref.experts.up_proj.data)  # up alone, in the module's own order
    assert arch.expert_dims(ref.experts) == (H, I)


def test_checkpoint_stores_up_alone(quantized):
    from moequant.checkpoint.format import read_headers

    _, outs, model = quantized
    E, I, H = next(m for n, m in model.named_modules() if n.endswith("mixer.experts")).up_proj.shape
    for out in outs.values():
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["activation"] == "relu2" and qc["intermediate"] == I and qc["hidden"] == H
        headers = read_headers([str(p) for p in out.glob("*.safetensors")])
        scales = {k: shape for k, (shape, _) in headers.items() if ".experts." in k and k.endswith(".scales")}
        up = [shape for k, shape in scales.items() if ".gate_up." in k]
        assert len(up) == E * len(qc["experts"])  # every expert of every MoE layer
        assert all(shape[-1] == I for shape in up)  # [G, N]: N = I rows, not 2I


def test_fresh_bf16_load_matches_the_16bit_model(quantized, tmp_path):
    src, outs, _ = quantized
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(outs["rtn8"]), str(outs["gptq4"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    base = torch.tensor(got["16-bit"]["logits"])

    def rel(name):
        return float((torch.tensor(got[str(outs[name])]["logits"]) - base).norm() / base.norm())

    for name in outs:
        assert got[str(outs[name])]["experts"] >= 1
        assert got[str(outs[name])]["activations"] == ["relu2"]
    err8, err4 = rel("rtn8"), rel("gptq4")
    assert err8 < 0.02  # the 8-bit bound
    assert err8 < err4 < 0.1  # 4 bits cost more than 8, and stay near the 16-bit model
