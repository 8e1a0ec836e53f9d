"""The whole quantized bundled model through the Triton kernels (CPU interpreter) matches the reference path.

Triton decides compiled-vs-interpreted at its first import, so on a CPU machine the comparison runs in a
child process started with TRITON_INTERPRET=1 (on CUDA it would run compiled in the child just the same).
Tolerance: fp32 activations, max |logit difference| <= 1e-3 * max |logit| (kernel tiles sum in another order).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import moequant
    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.config import ExpertSpec, Method, QuantizeConfig, QuantSpec
    sys.path.append(sys.argv[2])  # tests/, for helpers.py
    from helpers import set_kernel
    from moequant.checkpoint.loading import load_model

    model = load_model(None)  # bundled, fp32
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 128))
    cycle = [QuantSpec(Method.RTN, b, 128, sym=s) for b in (2, 3, 4, 8) for s in (False, True)]
    cycle[5] = QuantSpec(Method.KEEP, 16)  # a 16-bit expert in the same layer: the torch path adds it
    rtn = lambda b, gs=128: QuantSpec(Method.RTN, b, gs)
    cycle[1] = ExpertSpec(rtn(3), rtn(2))  # per-projection widths: gate/up and down in different kernel groups
    cycle[6] = ExpertSpec(rtn(4, 64), QuantSpec(Method.KEEP, 16))  # an integer gate/up, a 16-bit down: torch path
    for i in plan.layers:
        plan.layers[i] = [cycle[(e + i) % len(cycle)] for e in range(8)]
    g = torch.Generator().manual_seed(0)
    calib = CalibData(torch.randint(0, 4096, (4, 64), generator=g), ["x"] * 4, "random")
    api.quantize(model, plan, calib, sys.argv[1], QuantizeConfig(progress=False, min_tokens=0))
    ids = torch.randint(0, 4096, (2, 12), generator=g)
    import moequant.kernels.moe as kmoe
    calls, real = [], kmoe._triton_moe
    kmoe._triton_moe = lambda *a, **k: calls.append(1) or real(*a, **k)
    out, launched = {}, {}
    for kernel in ("reference", "triton"):
        assert set_kernel(model, kernel) == 4
        calls.clear()
        with torch.no_grad():
            out[kernel] = model(input_ids=ids).logits
        launched[kernel] = len(calls)
    diff = (out["triton"] - out["reference"]).abs().max().item()
    scale = out["reference"].abs().max().item()
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    set_kernel(loaded, "reference")
    with torch.no_grad():
        loaded_diff = (loaded(input_ids=ids).logits - out["reference"]).abs().max().item()
    qe = [m for m in loaded.modules() if type(m).__name__ == "QuantizedExperts"][0]
    widths = [(qe.slot(e).gate_up.bits, qe.slot(e).down.bits) for e in (1, 2) if hasattr(qe.slot(e).down, "bits")]
    print(json.dumps({"diff": diff, "scale": scale, "launched": launched, "loaded_diff": loaded_diff,
                      "widths": widths, "bit_map": loaded.config.quantization_config.experts["0"][:3]}))
    """
)


def test_bundled_model_triton_matches_reference(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MOEQUANT_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "q"), str(Path(__file__).resolve().parents[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["launched"] == {"reference": 0, "triton": 4}  # one fused call per MoE layer
    assert res["scale"] > 1.0
    assert res["diff"] <= 1e-3 * res["scale"], res
    # the checkpoint stores per-projection widths and loads them back: same reference logits, same widths
    assert res["loaded_diff"] <= 1e-5 * res["scale"], res
    assert res["widths"][0] == [3, 2], res
    assert res["bit_map"][1] == "rtn:3/rtn:2", res


NON_GATED_CHILD = textwrap.dedent(
    """
    import json, math, torch
    from moequant.arch.base import Activation
    from moequant.config import Method, QuantSpec
    from moequant.modules.qexperts import QuantizedExperts
    from moequant.modules.qlinear import DenseWeight, PackedWeight
    from moequant.quantizers.packed import PackedLinear

    H, I, E = 40, 24, 5
    g = torch.Generator().manual_seed(0)

    def packed(n, k, spec):
        codes = torch.randint(0, 1 << spec.bits, (n, k), generator=g)
        groups = math.ceil(k / spec.group_size)
        scales = (torch.rand(n, groups, generator=g) + 0.5) / ((1 << (spec.bits - 1)) * math.sqrt(k / 3))
        zeros = None if spec.sym else torch.randint(0, 1 << spec.bits, (n, groups), generator=g)
        return PackedWeight.from_packed(PackedLinear.from_codes(codes, scales, zeros, spec.bits, spec.group_size), spec)

    specs = [QuantSpec(Method.RTN, 2, 16), QuantSpec(Method.RTN, 4, 16, sym=True), QuantSpec(Method.KEEP, 16),
             QuantSpec(Method.RTN, 8, 32), QuantSpec(Method.RTN, 3, 16, sym=True)]
    qe = QuantizedExperts(specs, H, I, Activation.RELU2, dtype=torch.float32)
    for e, s in enumerate(specs):
        if s.method is Method.KEEP:  # a 16-bit expert: the torch path adds its term
            up = DenseWeight.from_weight(torch.randn(I, H, generator=g) / H**0.5, torch.float32)
            down = DenseWeight.from_weight(torch.randn(H, I, generator=g) / I**0.5, torch.float32)
        else:
            up, down = packed(I, H, s), packed(H, I, s)  # up alone: [I, H]
        qe.set_expert(e, up, down, s)
    x = torch.randn(13, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(13)])
    w = torch.rand(13, 2, generator=g).softmax(-1)
    out = {}
    for kernel in ("reference", "triton"):
        qe.kernel = kernel
        out[kernel] = qe(x, idx, w)
    layout = qe._packed_layout()
    qe.activation = Activation.MODULE_UNGATED  # the family's own function: the reference path, whatever asked
    print(json.dumps({
        "diff": (out["triton"] - out["reference"]).abs().max().item(),
        "scale": out["reference"].abs().max().item(),
        "gated": layout.gated, "inter": layout.intermediate, "packed": layout.num_global,
        "own_backend": qe.backend(x.device).value,
    }))
    """
)


def test_non_gated_experts_module_triton_matches_reference(tmp_path):
    """QuantizedExperts with a non-gated activation (relu2; up [I, H] per expert), mixed widths and a 16-bit
    expert: its packed layout is non-gated and the fused forward (interpreter) equals the reference forward."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MOEQUANT_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", NON_GATED_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (res["gated"], res["inter"], res["packed"]) == (False, 24, 4), res
    assert res["scale"] > 0.1
    assert res["diff"] <= 1e-4 * res["scale"], res  # fp32 activations
    assert res["own_backend"] == "reference"
