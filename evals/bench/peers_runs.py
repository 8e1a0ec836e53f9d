"""The peer tools' side of evals/bench/peers.py: quantize the bundled model with AutoRound, GPTQModel or HQQ,
each run in the tool's own virtual environment, where moequant is not installed. This file therefore imports
only the standard library at module level, and torch, safetensors and the tool inside the functions; the venv's
Python runs it by path with -P (evals/bench/ must not shadow packages: its kernels.py would hide Hugging Face's
`kernels`, which these tools install):

    <venv>/bin/python -P evals/bench/peers_runs.py auto-round --model M --calib C --out O --bits 3 \
        --variant experts --json R

Every quantization loads the checkpoint folder, quantizes, and writes its output folder; the parent times the
whole process. The result JSON holds the tool's own inner timings and what the parent needs to evaluate the
output: where the quantized weights are and, for HQQ, the bytes HQQ stores.

gptqmodel_quantize is also the GPTQModel run of evals/bench/vs_gptqmodel_runs.py (matched settings there)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # the bundled Mixtral's attention Linears


def load_input_ids(path: str):
    """The calibration windows [N, L] int64 the parent saved (evals/bench/child.py save_calibration)."""
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]


def _phases(t0: float, c0: float, t1: float, t2: float) -> dict:
    """Wall and CPU seconds of a load (t0..t1) + quantize (t1..t2) + save (t2..now) call started at (t0, c0)."""
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_s": t1 - t0,
        "quantize_s": t2 - t1,
        "save_s": wall - (t2 - t0),
    }


def load_dtype(name: str):
    """--dtype: None for "auto" (the tool's own choice), else that torch dtype."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def gptqmodel_quantize(
    model: str,
    input_ids,
    out: str,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    attention: bool = False,
    dtype=None,
    batch_size: int = 8,
    **options,
) -> tuple[dict, object]:
    """GPTQModel: load, quantize on `input_ids` [N, L] (in their order), save to `out`. attention=False keeps
    self_attn in 16 bits (a negative `dynamic` rule); the router is never quantized (GPTQModel's Mixtral
    definition skips it), nor lm_head (lm_head=False, its default). dtype None: GPTQModel's own choice (bf16 on
    CPU). `options`: more QuantizeConfig fields. Returns the timings and the QuantizeConfig."""
    from gptqmodel import GPTQModel, QuantizeConfig

    calibration = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in input_ids]
    dynamic = None if attention else {r"-:.*self_attn.*": {}}
    qc = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, dynamic=dynamic, **options)
    t0, c0 = time.perf_counter(), time.process_time()
    load = {} if dtype is None else {"dtype": dtype}
    m = GPTQModel.load(model, qc, **load)
    t1 = time.perf_counter()
    m.quantize(calibration, batch_size=batch_size, calibration_sort=None)
    t2 = time.perf_counter()
    m.save(out)
    timings = _phases(t0, c0, t1, t2)
    rows = list(Path(out, "quant_log.csv").read_text().splitlines())[1:]
    timings |= {"fallback_modules": sum(1 for r in rows if "fallback" in r), "modules": len(rows)}
    return timings, qc


def llmcompressor_quantize(
    model: str,
    input_ids,
    out: str,
    bits: int,
    group_size: int = 128,
    attention: bool = False,
    dtype=None,
    batch_size: int = 8,
    all_experts: bool = False,
) -> dict:
    """llm-compressor: the model loaded, its fused experts made per-expert Linears (`linearize_moe`; its loader
    `load_quantizable_moe` would do the same while loading, but its transformers patching imports every model
    module, and transformers' aria module needs torchvision, whose CPU build is not on the package index), then
    `oneshot` with a GPTQModifier on `input_ids` [N, L] in their order (no shuffling), symmetric int `bits`,
    groups of `group_size`, damping 1%, no act-order; saves its compressed-tensors checkpoint to `out`.
    attention=False keeps self_attn in 16 bits; the router (`mlp.gate`) and lm_head are ignored.
    all_experts=False: each expert's Hessian sees only the tokens routed to it (as GPTQModel's and moequant's);
    True is llm-compressor's own default (every token through every expert). Returns the timings."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    n, seqlen = input_ids.shape
    rows = input_ids.tolist()
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seqlen for _ in rows]})
    ignore = ["lm_head", "re:.*mlp.gate$", *([] if attention else ["re:.*self_attn.*"])]
    recipe = GPTQModifier(
        targets="Linear",
        scheme=f"W{bits}A16",
        ignore=ignore,
        dampening_frac=0.01,
        actorder=None,
        block_size=128,
    )
    if group_size != 128:
        raise ValueError("the W*A16 presets use groups of 128")
    t0, c0 = time.perf_counter(), time.process_time()
    m = linearize_moe(AutoModelForCausalLM.from_pretrained(model, dtype=dtype or "auto"))
    t1 = time.perf_counter()
    oneshot(
        model=m,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=batch_size,
        moe_calibrate_all_experts=all_experts,
    )
    t2 = time.perf_counter()
    m.save_pretrained(out, save_compressed=True)
    return _phases(t0, c0, t1, t2) | {
        "torch_threads": torch.get_num_threads(),
        "config": {"scheme": f"W{bits}A16", "ignore": ignore, "dampening_frac": 0.01, "actorder": None,
                   "moe_calibrate_all_experts": all_experts, "dtype": str(m.dtype)},
    }  # fmt: skip


def autoround_quantize(
    model: str,
    input_ids,
    out: str,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    attention: bool = False,
    iters: int | None = None,
    batch_size: int = 8,
) -> dict:
    """AutoRound (sign-gradient rounding) with `input_ids` [N, L] as its dataset (batches of `batch_size`),
    nsamples N, seqlen L, iters None: its default (200). attention=False keeps q/k/v/o in 16 bits
    (layer_config bits 16); AutoRound skips the router by itself and lm_head unless asked. Writes the
    fake-quantized 16-bit model (format="fake"); returns the folder it wrote and the timings."""
    os.environ.setdefault("AR_DISABLE_META_LOAD", "1")  # its meta-device load looks for per-expert gate_proj
    # keys, which a Mixtral checkpoint (w1/w2/w3) does not have, and stops; this loads the model on CPU
    import torch
    from auto_round import AutoRound

    n, seqlen = input_ids.shape
    batches = [input_ids[i : i + batch_size] for i in range(0, n, batch_size)]  # [B, L] each
    n_layers = json.loads(Path(model, "config.json").read_text())["num_hidden_layers"]
    keep = (
        {}
        if attention
        else {f"model.layers.{i}.self_attn.{p}": {"bits": 16} for i in range(n_layers) for p in ATTENTION}
    )
    kwargs = {} if iters is None else {"iters": iters}
    t0, c0 = time.perf_counter(), time.process_time()
    ar = AutoRound(
        model,
        scheme=f"W{bits}A16",
        group_size=group_size,
        sym=sym,
        dataset=batches,
        nsamples=n,
        seqlen=seqlen,
        batch_size=batch_size,
        layer_config=keep or None,
        device_map="cpu",
        **kwargs,
    )
    _, folder = ar.quantize_and_save(out, format="fake")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "folder": str(folder),
        "iters": getattr(ar, "iters", iters),
        "torch_threads": torch.get_num_threads(),
    }


def hqq_quantize(model: str, out: str, bits: int, group_size: int = 128, attention: bool = False) -> dict:
    """HQQ (calibration-free half-quadratic quantization) of every routed expert projection, and of q/k/v/o
    when attention=True: each [N, K] weight becomes an HQQLinear (groups of `group_size` along K, HQQ's
    defaults otherwise: optimize=True, axis=1, round_zero for 4 bits, scale and zero in the bf16 compute
    dtype). HQQ quantizes nn.Linear modules, and transformers 5 fuses the experts into two parameters, so each
    expert's gate, up and down slices are quantized as Linears. Writes what HQQ stores (W_q, scale, zero per
    projection: hqq.safetensors) and, after the clock stops, HQQ's own dequantization of each projection
    (dequantized.safetensors, per-projection names) for the parent's evaluation."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    t0, c0 = time.perf_counter(), time.process_time()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    stored, dequantized, stored_bytes, weights = {}, {}, 0, 0

    def quantize(name: str, w) -> None:  # w [N, K]
        nonlocal stored_bytes, weights
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        lin.weight.data = w.contiguous()
        q = HQQLinear(lin, cfg, compute_dtype=torch.bfloat16, device="cpu")
        parts = {"W_q": q.W_q, "scale": q.meta["scale"], "zero": q.meta["zero"]}
        for k, t in parts.items():
            stored[f"{name}.{k}"] = t.contiguous()
            stored_bytes += t.numel() * t.element_size()
        dequantized[name] = q.dequantize()
        weights += w.numel()

    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            ex = layer.mlp.experts
            inter = ex.down_proj.shape[-1]
            for e in range(ex.gate_up_proj.shape[0]):
                p = f"model.layers.{i}.mlp.experts.{e}"
                quantize(f"{p}.gate_proj", ex.gate_up_proj[e, :inter])  # [I, H]
                quantize(f"{p}.up_proj", ex.gate_up_proj[e, inter:])  # [I, H]
                quantize(f"{p}.down_proj", ex.down_proj[e])  # [H, I]
            if attention:
                for a in ATTENTION:
                    quantize(f"model.layers.{i}.self_attn.{a}", getattr(layer.self_attn, a).weight.data)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(stored, str(Path(out, "hqq.safetensors")))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file({k: v.contiguous() for k, v in dequantized.items()}, str(Path(out, "dequantized.safetensors")))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "stored_bytes": stored_bytes,
        "quantized_weights": weights,
        "config": {k: v for k, v in cfg["weight_quant_params"].items()},
    }


def gptqmodel_dequantize(out: str, dest: str) -> dict:
    """GPTQModel's own loader and CPU kernel module (TorchLinear) on a saved checkpoint: every quantized
    module's dequantize_weight(), as [N, K] float32, to `dest` (the parent compares its own unpacking with it)."""
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import save_file

    g = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
    weights = {}
    for name, mod in g.model.named_modules():
        if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
            w = mod.dequantize_weight().float()  # [K, N], as the GPTQ kernels hold it
            weights[name] = w.T.contiguous()  # [N, K]
    save_file(weights, dest)
    return {"modules": len(weights)}


def _versions(*dists: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "tool",
        choices=["auto-round", "gptqmodel", "hqq", "llm-compressor", "gptqmodel-dequantize", "versions"],
    )
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--out")
    ap.add_argument("--bits", type=int)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--variant", choices=["experts", "all-linear"], default="experts")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="GPTQModel's load dtype: auto (its own) or float32")
    ap.add_argument(
        "--matched",
        action="store_true",
        help="gptqmodel: symmetric, no act-order, no GAR, damping 1%%, RTN below 32 routed tokens (vs_gptqmodel's "
        "matched settings); llm-compressor: routed tokens only (its default runs every token through every expert)",
    )
    ap.add_argument("--dest")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    attention = a.variant == "all-linear"
    if a.tool == "versions":
        res = _versions("torch", "transformers", "auto-round", "gptqmodel", "hqq", "llmcompressor",
                        "compressed-tensors")  # fmt: skip
    elif a.tool == "gptqmodel-dequantize":
        res = gptqmodel_dequantize(a.out, a.dest)
    elif a.tool == "gptqmodel":
        dtype = load_dtype(a.dtype)
        ids = load_input_ids(a.calib)
        matched = {}
        if a.matched:
            from gptqmodel.quantization.config import Fallback

            matched = dict(
                desc_act=False, act_group_aware=False, damp_percent=0.01, fallback=Fallback(threshold=32)
            )
        res, qc = gptqmodel_quantize(
            a.model, ids, a.out, a.bits, a.group_size, a.matched, attention, dtype, a.batch_size, **matched
        )
        res["config"] = {k: str(v) for k, v in qc.to_dict().items() if k != "meta"}
    elif a.tool == "llm-compressor":
        res = llmcompressor_quantize(
            a.model, load_input_ids(a.calib), a.out, a.bits, a.group_size, attention, load_dtype(a.dtype),
            a.batch_size,
            all_experts=not a.matched,
        )  # fmt: skip
    elif a.tool == "auto-round":
        ids = load_input_ids(a.calib)
        res = autoround_quantize(
            a.model, ids, a.out, a.bits, a.group_size, False, attention, a.iters, a.batch_size
        )
    else:
        res = hqq_quantize(a.model, a.out, a.bits, a.group_size, attention)
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
