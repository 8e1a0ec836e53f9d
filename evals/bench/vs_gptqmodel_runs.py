"""The child runs of evals/bench/vs_gptqmodel.py, each in its own process: quantize with moequant or GPTQModel
("matched" or "defaults" settings) and time it, or evaluate a checkpoint's perplexity; results to a JSON file.
GPTQModel is imported only inside functions (here and in peers_runs.gptqmodel_quantize, the GPTQModel run this
benchmark shares with evals/bench/peers.py), so its patches of transformers stay in its child."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moequant.evals.bench.child import load_calibration
from moequant.evals.bench.gptq_v1 import dequantized_gptqmodel_into
from moequant.evals.bench.peers_runs import gptqmodel_quantize
from moequant.evals.env_info import source_fingerprint

CHECK_WINDOWS = 4  # windows per domain for the bf16 kernel cross-check


def run_ours(model: str, calib: str, out: str, variant: str) -> dict:

    from moequant import api
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.config import GPTQOptions, Method, QuantizeConfig, QuantSpec

    tok = load_tokenizer(model)
    data = load_calibration(calib)
    if variant in ("matched", "matched-no-fallback"):  # GPTQModel's: symmetric, no act-order, unweighted
        spec = QuantSpec(Method.GPTQ, 4, 128, sym=True)
        config = QuantizeConfig(
            batch_size=8,
            progress=False,
            gptq=GPTQOptions(act_order=False, percdamp=0.01),
            weight_by_routing=False,
            min_tokens=32 if variant == "matched" else 1,  # no-fallback: GPTQ wherever a token routes
        )
    else:  # our defaults as they stand in the tree at run time (spec and QuantizeConfig defaults)
        spec = QuantSpec(Method.GPTQ, 4, 128)
        config = QuantizeConfig(batch_size=8, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = api.make_uniform_plan(model, spec, act_order=config.stores_g_idx)
    summary = api.quantize(model, plan, data, out, config, tokenizer=tok)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cfg = config.to_json()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "fallbacks": summary.fallbacks,
        "inner_s": summary.seconds,
        "config": {"spec": spec.to_json()} | cfg,
    }


def run_gptqmodel(model: str, calib: str, out: str, variant: str) -> dict:
    import torch
    from gptqmodel.quantization.config import Fallback

    data = load_calibration(calib)
    common = dict(bits=4, group_size=128, sym=True, attention=False, dtype=torch.float32, desc_act=False)
    if variant == "matched":
        timings, qc = gptqmodel_quantize(
            model, data.input_ids, out, **common, act_group_aware=False, damp_percent=0.01,
            fallback=Fallback(threshold=32),
        )  # fmt: skip
    else:  # GPTQModel's own defaults for everything else (GAR on, damp 0.05, fallback below 0.5% of tokens)
        timings, qc = gptqmodel_quantize(model, data.input_ids, out, **common)
    return timings | {
        "config": {
            k: str(v)
            for k, v in qc.to_dict().items()
            if k in ("bits", "group_size", "sym", "desc_act", "dynamic")
        }
        | {k: qc.to_dict().get("meta", {}).get(k) for k in ("damp_percent", "act_group_aware", "fallback")},
    }


def eval_child(kind: str, model: str, out: str | None) -> dict:
    import torch

    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.evals.perplexity import perplexity

    tok = load_tokenizer(model)
    t0 = time.perf_counter()
    res: dict = {}
    if kind == "original":
        m = load_model(model)  # float32 on CPU
    elif kind == "ours":
        import moequant  # noqa: F401  (registers the quantizer with transformers)

        m = load_model(out)
    elif kind == "gptqmodel":
        m = load_model(model)
        n, attn = dequantized_gptqmodel_into(m, out)
        res["dequantized_modules"] = n
        res["quantized_attention_modules"] = len(attn)
    else:
        raise ValueError(kind)
    res["ppl"] = perplexity(m, tok, split="test")
    if kind == "gptqmodel":  # cross-check: the dequantized model vs GPTQModel's own loader + CPU kernel, bf16
        res["check_dequant_bf16"] = perplexity(
            m.to(torch.bfloat16), tok, split="test", max_windows=CHECK_WINDOWS
        )
        del m
        from gptqmodel import BACKEND, GPTQModel

        g = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
        res["check_kernel_bf16"] = perplexity(g.model, tok, split="test", max_windows=CHECK_WINDOWS)
    res["eval_s"] = time.perf_counter() - t0
    return res


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what")
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib")
    ap.add_argument("--out")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    if a.what in ("ours-matched", "ours-matched-no-fallback"):
        res = run_ours(a.model, a.calib, a.out, a.what.removeprefix("ours-"))
    elif a.what == "ours-defaults":
        res = run_ours(a.model, a.calib, a.out, "defaults")
    elif a.what.startswith("gptqmodel-"):
        res = run_gptqmodel(a.model, a.calib, a.out, a.what.removeprefix("gptqmodel-"))
    elif a.what.startswith("eval-"):
        res = eval_child(a.what.removeprefix("eval-"), a.model, a.out)
    else:
        raise SystemExit(f"unknown child run {a.what}")
    res["source"] = source_fingerprint()
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0
