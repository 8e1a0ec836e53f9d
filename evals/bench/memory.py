"""Peak memory of `moequant quantize` on a synthetic MoE checkpoint larger than one layer by far.

    python -m moequant.evals.bench.memory                          # 8 layers x 8 experts, hidden 2048, inter 2816
    python -m moequant.evals.bench.memory --layers 2 --hidden 256 --intermediate 512 --samples 8   # smoke run

The target (Quantization issue): quantizing a checkpoint with >= 2 GB of expert weights keeps peak RSS at
most one layer's weights + the calibration activations + 30%.

1. Writes a random Mixtral checkpoint (bf16 safetensors, one shard per decoder layer plus an index, per-expert
   `w1/w3/w2` keys as Mixtral checkpoints store them) layer by layer, so building it never holds more than one
   layer, plus the byte tokenizer (vocab 256) and a calibration .txt (the bundled corpus's train split).
2. Runs `moequant quantize CKPT --uniform --bits 4 --method gptq --calib calib.txt --samples N --seq-len L`
   in a subprocess and samples its RSS (psutil, children included) every 50 ms, and the kernel's high-water
   mark VmHWM of the child (exact, not sampled; the last value read before it exits); the child's ru_maxrss
   comes from wait4. RSS is split into anonymous memory and file-backed pages (the safetensors mmaps).
3. With --phases (default on), runs the same command again in an instrumented child that wraps the pipeline's
   functions (no library change) and records RSS at each phase boundary, the peak inside each phase, and the
   bytes of live CPU tensors at the boundaries, to show where the memory goes.
4. Prints the table, writes evals/results/bench_memory.{md,json}, deletes the multi-GB temporary folder
   (unless --keep).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from moequant.evals.bench.memory_child import instrumented_main
from moequant.evals.bench.memory_fixture import (
    synthetic_config,
    write_calibration_text,
    write_synthetic_checkpoint,
)
from moequant.evals.bench.memory_probe import MB, run_sampled
from moequant.evals.bench.memory_report import bounds, markdown, summarize_phases
from moequant.evals.env_info import cpu_model, source_fingerprint

RESULTS = Path(__file__).resolve().parents[1] / "results"


def moequant_cmd() -> list[str]:
    exe = shutil.which("moequant")
    return [exe] if exe else [sys.executable, "-m", "moequant.cli"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--workdir", default=None, help="where the temporary checkpoint goes (default: system tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkpoint and output")
    ap.add_argument("--no-phases", action="store_true", help="skip the instrumented second run")
    ap.add_argument("--tag", default="", help="suffix for the results files (bench_memory<tag>.md/json)")
    ap.add_argument(
        "--phase-layers", type=int, default=2, help="layers the instrumented run covers (0 = all; default 2)"
    )
    ap.add_argument(
        "--malloc-trim",
        action="store_true",
        help="instrumented run: malloc_trim(0) after each released layer",
    )
    ap.add_argument("--no-plain", action="store_true", help="skip the plain run (instrumented run only)")
    ap.add_argument(
        "--what-if",
        default="",
        help="instrumented run only: comma list of release_original (move the swapped-out fused experts to "
        "meta when a layer is released), close_handles (drop the safetensors mmaps after each layer)",
    )
    ap.add_argument("--render", default=None, help="only re-render the .md from a saved results .json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        md = markdown(res)
        Path(args.render).with_suffix(".md").write_text(md)
        print(md)
        return 0

    import torch
    import transformers

    load_before = os.getloadavg()
    config = synthetic_config(
        args.hidden, args.intermediate, args.layers, args.experts, args.top_k, args.heads
    )
    work = Path(tempfile.mkdtemp(prefix="moequant-bench-memory-", dir=args.workdir))
    res: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "".join(
            f"{k}={v} "
            for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
        )
        + "python -m moequant.evals.bench.memory "
        + " ".join(sys.argv[1:] if argv is None else argv),  # the malloc settings compared: the command's own
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU used",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_before": tuple(round(x, 2) for x in load_before),
        "config": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "experts": args.experts,
            "top_k": args.top_k,
            "heads": args.heads,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "phase_layers": args.phase_layers,
            "malloc_trim": args.malloc_trim,
            "what_if": args.what_if,
        },
    }
    try:
        ckpt, calib, out = work / "synthetic-mixtral", work / "calib.txt", work / "out"
        t = time.perf_counter()
        sizes = write_synthetic_checkpoint(ckpt, config)
        res["build_s"] = time.perf_counter() - t
        res["sizes"] = sizes
        write_calibration_text(calib)
        print(
            f"checkpoint: {sizes['expert_bytes'] / 1e9:.3f} GB of expert weights, {sizes['total_bytes'] / 1e9:.3f} GB "
            f"total, in {res['build_s']:.0f} s -> {ckpt}",
            flush=True,
        )
        qargs = [
            "quantize", str(ckpt), "--uniform", "--bits", "4", "--method", "gptq", "--calib", str(calib),
            "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out), "--quiet",
        ]  # fmt: skip
        env = dict(os.environ)
        env["BENCH_MEMORY_PHASE_LAYERS"] = str(args.phase_layers)
        if args.malloc_trim:
            env["BENCH_MEMORY_MALLOC_TRIM"] = "1"
        if args.what_if:
            env["BENCH_MEMORY_WHATIF"] = args.what_if
        res["quantize_cmd_display"] = [
            "moequant",
            "quantize",
            "<synthetic>",
            *qargs[2:8],
            "<calib.txt>",
            *qargs[9:13],
        ]
        res["quantize_cmd_display"] += ["--out", "<out>", "--quiet"]
        if not args.no_plain:
            res["source_plain"] = source_fingerprint()
            plain = run_sampled(moequant_cmd() + qargs, env, work / "plain.log")
            res["plain"] = plain
            if plain["returncode"] != 0:
                print((work / "plain.log").read_text()[-3000:], file=sys.stderr)
                raise SystemExit(f"quantize failed with status {plain['returncode']}")
            report = json.loads((out / "quant_report.json").read_text())
            res["fallbacks"] = report["fallbacks"]
            print(
                f"plain run: peak RSS {plain['peak_rss_MB']:.0f} MB (anon {plain['peak_anon_MB']:.0f} MB), "
                f"ru_maxrss {plain['ru_maxrss_MB']:.0f} MB, {plain['wall_s']:.0f} s",
                flush=True,
            )
        if not args.no_phases:
            shutil.rmtree(out, ignore_errors=True)
            phase_json = work / "phases.json"
            cmd = [  # -m, not the file: evals/bench/ on sys.path would shadow packages (kernels.py)
                sys.executable,
                "-m",
                "moequant.evals.bench.memory",
                "--_instrumented",
                str(phase_json),
                "--",
                *qargs,
            ]
            res["source_phases"] = source_fingerprint()
            run = run_sampled(cmd, env, work / "phases.log")
            if run["returncode"] != 0:
                print((work / "phases.log").read_text()[-3000:], file=sys.stderr)
                raise SystemExit(f"instrumented quantize failed with status {run['returncode']}")
            phases = json.loads(phase_json.read_text())
            res["phases_run"] = {k: v for k, v in run.items() if k != "timeline"}
            res["phases"] = phases
            first = next(
                (
                    int(e["at"].split()[0][1:])
                    for e in phases["events"]
                    if "gptq" in e["at"] and e["at"][1:2].isdigit()
                ),
                0,
            )
            res["phase_rows"] = summarize_phases(phases, first)
            res["baseline_MB"] = next(e["rss_MB"] for e in phases["events"] if e["at"] == "after imports")
            # RSS just before the first decoder layer is read: runtime + skeleton + base weights + inputs
            res["before_layers_MB"] = next(
                e["rss_MB"] for e in phases["events"] if e["at"].endswith(" load_layer")
            )
        res["bounds"] = bounds(config, sizes, args.samples, args.seq_len)
        run = res.get("plain") or res["phases_run"]
        peak = max(run["peak_rss_MB"], run.get("vm_hwm_MB", 0.0)) * MB  # the exact high-water mark counts too
        res["verdict_peak_MB"] = round(peak / MB, 1)
        res["pass_bf16"] = peak <= res["bounds"]["bound_bf16"]
        res["pass_fp32"] = peak <= res["bounds"]["bound_fp32"]
        if "before_layers_MB" in res:  # the same bound on the growth over the pre-layer level
            inc = peak - res["before_layers_MB"] * MB
            res["increment_pass_fp32"] = inc <= res["bounds"]["bound_fp32"]
            res["increment_pass_bf16"] = inc <= res["bounds"]["bound_bf16"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        res["workdir_removed"] = not work.exists()
    res["loadavg_after"] = tuple(round(x, 2) for x in os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_memory{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_instrumented":
        out_json, rest = sys.argv[2], sys.argv[3:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        sys.exit(instrumented_main(out_json, rest))
    sys.exit(main())
