"""A quantized checkpoint loaded and run on the fused path holds each weight once.

The bundled model is quantized with a mix of widths in every layer (and one 16-bit expert per layer), saved,
and loaded by `from_pretrained` in the checkpoint's own dtype. One forward runs on the Triton path (CPU
interpreter, in a child started with TRITON_INTERPRET=1: the fused layout is built exactly as on a GPU). Then
every tensor alive in the process is found (gc) and its storage counted once (by data pointer): the total
must stay within 1.05 x the checkpoint's safetensors tensor bytes plus the output logits. A fused layout that
copies the experts instead of sharing their storage holds the integer experts twice and fails this.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import gc, glob, json, sys, torch
    from transformers import AutoModelForCausalLM
    import moequant
    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.config import Method, QuantizeConfig, QuantSpec
    from moequant.checkpoint.format import tensor_bytes
    sys.path.append(sys.argv[2])  # tests/, for helpers.py
    from helpers import set_kernel
    from moequant.checkpoint.loading import load_model

    out_dir = sys.argv[1]
    model = load_model(None)  # bundled
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    cycle = [QuantSpec(Method.RTN, 4, 32), QuantSpec(Method.RTN, 3, 32, sym=True), QuantSpec(Method.RTN, 2, 32),
             QuantSpec(Method.RTN, 8, 32)]
    for i in plan.layers:
        plan.layers[i] = [cycle[(e + i) % 4] for e in range(7)] + [QuantSpec(Method.KEEP, 16)]
    g = torch.Generator().manual_seed(0)
    calib = CalibData(torch.randint(0, 4096, (2, 32), generator=g), ["x"] * 2, "random")
    api.quantize(model, plan, calib, out_dir, QuantizeConfig(progress=False, min_tokens=0))
    del model, calib
    gc.collect()

    def live_bytes():
        gc.collect()
        seen, total = set(), 0
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                st = o.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        return total

    base = live_bytes()  # what the process holds before loading (torch and transformers' own tensors)
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto").eval()
    assert set_kernel(loaded, "triton") == 4
    ids = torch.randint(0, 4096, (2, 16), generator=g)
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    packed = sum(m._packed is not None for m in loaded.modules() if getattr(m, "is_moequant_experts", False))
    files = glob.glob(out_dir + "/*.safetensors")
    print(json.dumps({
        "live": live_bytes() - base, "checkpoint": tensor_bytes(files),
        "logits": logits.numel() * logits.element_size(), "packed_layers": packed,
    }))
    """
)


def test_fused_model_holds_each_weight_once(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MOEQUANT_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "q"), str(Path(__file__).resolve().parents[1])],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["packed_layers"] == 4  # every layer ran on the fused path
    assert res["live"] <= 1.05 * res["checkpoint"] + res["logits"], res
    assert res["live"] >= 0.9 * res["checkpoint"], res  # the count sees the model at all


def test_shared_layout_keeps_outputs_and_saves(tmp_path):
    """Once the experts point into the stacked layout, the reference path gives the same logits, and
    save_pretrained of the loaded model writes a checkpoint that loads to the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.checkpoint.loading import load_model
    from moequant.config import Method, QuantizeConfig, QuantSpec

    model = load_model(None)
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    for i in plan.layers:
        plan.layers[i] = [QuantSpec(Method.RTN, 3 if e % 2 else 4, 32, sym=e % 3 == 0) for e in range(8)]
    g = torch.Generator().manual_seed(0)
    calib = CalibData(torch.randint(0, 4096, (2, 32), generator=g), ["x"] * 2, "random")
    api.quantize(model, plan, calib, str(tmp_path / "q"), QuantizeConfig(progress=False, min_tokens=0))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype="auto").eval()
    ids = torch.randint(0, 4096, (1, 8), generator=g)
    with torch.no_grad():
        before = loaded(input_ids=ids).logits
    experts = [m for m in loaded.modules() if getattr(m, "is_moequant_experts", False)]
    for m in experts:
        packed = m._packed_layout()
        group = packed.gate_up[0]
        slot_w = m.slot(group.experts[0]).gate_up.qweight
        assert slot_w.untyped_storage().data_ptr() == group.qweight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype="auto").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)


def test_non_gated_reference_forward_equals_transformers_nemotron_h_experts():
    """A non-gated QuantizedExperts (Nemotron-H: relu2, the input projection up alone [I, H] per expert, at
    mixed widths) runs on the reference path what transformers' own NemotronHExperts computes with the
    dequantized weights, on fresh random inputs and routings."""
    import torch
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    from moequant.arch import Activation
    from moequant.arch.tiny import tiny_config
    from moequant.config import Method, QuantSpec
    from moequant.modules.qexperts import QuantizedExperts
    from moequant.quantize.methods import HandlerOptions, quantize_stack

    config = tiny_config("nemotron_h")
    ref = NemotronHExperts(config).float()
    E, I, H = ref.up_proj.shape  # [E, I, H]
    g = torch.Generator().manual_seed(11)
    up = torch.randn(E, I, H, generator=g) * 0.3  # [E, I, H]
    down = torch.randn(E, H, I, generator=g) * 0.3  # [E, H, I]
    specs = [QuantSpec(Method.RTN, (2, 3, 4, 8)[e % 4], 32) for e in range(E)]
    qe = QuantizedExperts(specs, H, I, Activation.RELU2, dtype=torch.float32)
    assert qe.slot(0).gate_up.dequantize(torch.float32).shape == (I, H)  # I rows, not 2I
    opts = HandlerOptions()
    for e, spec in enumerate(specs):
        (gu,), _ = quantize_stack(up[e : e + 1], None, spec, opts)
        (dn,), _ = quantize_stack(down[e : e + 1], None, spec, opts)
        qe.set_expert(e, gu, dn, spec)
    with torch.no_grad():
        for e in range(E):  # transformers' module holds the dequantized weights
            ref.up_proj[e] = qe.slot(e).gate_up.dequantize(torch.float32)
            ref.down_proj[e] = qe.slot(e).down.dequantize(torch.float32)
        assert (ref.up_proj - up).abs().max() > 1e-3  # the comparison is with the quantized weights
        x = torch.randn(40, H, generator=g)  # [T, H]
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(40)])  # [T, 2]
        w = torch.rand(40, 2, generator=g)  # [T, 2]
        want = ref(x, idx, w)  # [T, H]
        got = qe._forward_reference(x, idx, w, range(E))  # [T, H]
    assert want.abs().max() > 0.1
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
