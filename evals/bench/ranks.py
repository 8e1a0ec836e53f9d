"""Expert parallelism on this CPU: `torchrun --nproc-per-node N` x 1 thread against one process x 1 thread,
quantizing one real-shape MoE layer, same bytes out.

    python -m moequant.evals.bench.ranks                     # OLMoE-1B-7B layer shapes, 2 ranks, 2 pairs
    python -m moequant.evals.bench.ranks --world 4 --pin     # 4 ranks, each pinned to core (rank mod cores)
    python -m moequant.evals.bench.ranks --repeats 1 --samples 16 --seq-len 128   # a quick look

--pin: every process (the 1-rank run included) is pinned to one core, LOCAL_RANK mod the cores it may use
(os.sched_setaffinity, before moequant starts), so no rank's thread migrates; with more ranks than cores,
ranks share cores and the ratio measures that sharing, not the split.

1. Writes a random-weight bf16 checkpoint with one OLMoE-1B-7B layer (64 experts, hidden 2048, intermediate
   1024, top-8; per-expert keys as published) and the bundled corpus as a .txt (memory_fixture.py).
2. Runs, alternately (A B A B ...), `moequant quantize CKPT --uniform --bits 3` as one process and under
   `torchrun --nproc-per-node 2`, both with OMP_NUM_THREADS=1 (one thread per rank): the whole command,
   start-up, calibration and writing included.
3. Checks that both wrote the same shard bytes, and records every run's wall time, the ratio per pair and
   its median, and the work per expert it balances (bytes and multiply-adds, for the floor), in
   evals/results/bench_ranks.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moequant.evals.bench.memory_fixture import write_calibration_text, write_synthetic_checkpoint
from moequant.evals.bench.real_shapes import shape_config

RESULTS = Path(__file__).resolve().parents[1] / "results"


PINNED = "--_pinned"  # `python -m moequant.evals.bench.ranks --_pinned ARGS`: pin, then `moequant ARGS`


def _pinned_main(args: list[str]) -> int:
    """Pin this process to one core (LOCAL_RANK mod the cores it may use), then run moequant's command line."""
    from moequant.cli.main import main as cli_main

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", "0")) % len(cores)]})
    sys.argv = ["moequant", *args]
    return cli_main()


JOBS = {  # what each run does: the whole command, with its own arguments
    "quantize": ["quantize", "--uniform", "--bits", "3"],  # profile-free: calibration, quantize pass, write
    "plan": ["plan", "--bits", "2.5"],  # profile, damage table, streamed probe, knapsack
}


def _commands(
    job: str, ckpt: Path, calib: Path, out: Path, samples: int, seq_len: int, world: int, pin: bool
) -> dict[str, list[str]]:
    verb, *opts = JOBS[job]
    args = [verb, str(ckpt), *opts, "--calib", str(calib), "--samples", str(samples), "--seq-len", str(seq_len),
            "--device", "cpu", "--quiet", "--overwrite"]  # fmt: skip
    entry = ["-m", "moequant.evals.bench.ranks", PINNED] if pin else ["-m", "moequant"]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    target = (lambda d: ["--out", str(d / "plan.json")]) if job == "plan" else (lambda d: ["--out", str(d)])
    return {
        "1 rank": [sys.executable, *entry, *args, *target(out / "one")],
        f"{world} ranks": [*many, *entry, *args, *target(out / "many")],
    }


def _same_output(job: str, one: Path, many: Path) -> tuple[bool, float | None]:
    """quantize: (the same shard bytes, None); plan: (the same widths, the largest relative difference of the
    probe's recorded per-layer estimates)."""
    if job == "quantize":
        return _shards(one) == _shards(many), None
    a, b = (json.loads((d / "plan.json").read_text()) for d in (one, many))
    ea, eb = a["estimate"].get("loss_increase", {}), b["estimate"].get("loss_increase", {})
    rel = max((abs(eb[k] - v) / abs(v) for k, v in ea.items() if v), default=0.0)
    return a["layers"] == b["layers"], rel


def _run(cmd: list[str], extra_env: dict[str, str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra_env)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="A/B pairs")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--world", type=int, default=2, help="ranks of the torchrun run")
    ap.add_argument("--job", choices=sorted(JOBS), default="quantize", help="the command both runs time")
    ap.add_argument("--pin", action="store_true", help="pin each process to one core (LOCAL_RANK mod cores)")
    ap.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment of both commands, e.g. MALLOC_MMAP_THRESHOLD_=1073741824 (glibc serves tensors "
        "from its heap instead of moequant's 4 MiB mmap threshold)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    extra_env = dict(kv.split("=", 1) for kv in args.env)

    config = shape_config("olmoe", 1)
    E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
    tokens = args.samples * args.seq_len
    routed = tokens * config.num_experts_per_tok / E  # mean routed tokens per expert
    # multiply-adds per expert (quantize/assign.py's cost): Hessians, GPTQ solve, forward
    macs = sum(routed * N * K + routed * K * K + N * K * K for N, K in ((2 * I, H), (H, I)))
    work = tempfile.mkdtemp(prefix="moequant-ranks-")
    try:
        ckpt, calib, out = Path(work) / "ckpt", Path(work) / "calib.txt", Path(work) / "out"
        write_synthetic_checkpoint(ckpt, config)
        write_calibration_text(calib)
        cmds = _commands(args.job, ckpt, calib, out, args.samples, args.seq_len, args.world, args.pin)
        many = f"{args.world} ranks"
        walls: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                walls[name].append(_run(cmd, extra_env))
        same, est_rel = _same_output(args.job, out / "one", out / "many")
        report = out / "many" / "quant_report.json"
        ranks_named = (
            sorted({r["rank"] for r in json.loads(report.read_text())["experts"]})
            if report.is_file()
            else None
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [a / b for a, b in zip(walls["1 rank"], walls[many], strict=True)]
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), CPU only",
        "command": "python -m moequant.evals.bench.ranks "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "layer": {"experts": E, "hidden": H, "intermediate": I, "top_k": config.num_experts_per_tok},
        "environment": extra_env,
        "world": args.world,
        "pinned": args.pin,
        "cores": len(os.sched_getaffinity(0)),
        "calibration_tokens": tokens,
        "mean_routed_tokens_per_expert": routed,
        "gmac_per_expert": macs / 1e9,
        "gmac_layer": macs * E / 1e9,
        "expert_bytes_bf16": E * 3 * H * I * 2,
        "walls_s": walls,
        "ratio_1_over_many": ratios,
        "median_ratio": statistics.median(ratios),
        "job": " ".join(JOBS[args.job]),
        "same_output": same,
        "probe_estimate_max_rel_diff": est_rel,
        "ranks_in_report": ranks_named,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"bench_ranks{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# Expert parallelism: {many} x 1 thread vs 1 rank x 1 thread (one OLMoE-1B-7B-shape layer)",
        "",
        f"- date: {record['date']}; machine: {record['machine']}",
        f"- command: `{record['command']}`",
        f"- layer: {E} experts, hidden {H}, intermediate {I}, top-{config.num_experts_per_tok}; "
        f"{record['expert_bytes_bf16'] / 1e9:.2f} GB of bf16 experts; {tokens} calibration tokens, "
        f"{routed:.0f} routed per expert on average",
        *(
            [
                f"- work: {macs / 1e9:.1f} GMAC per expert (Hessians, GPTQ solve, forward), {macs * E / 1e12:.2f} "
                "TMAC for the layer, split by cost over the ranks"
            ]
            if args.job == "quantize"
            else []
        ),  # fmt: skip
        f"- each run is the whole `moequant {' '.join(JOBS[args.job])}` command (start-up, calibration, writing); "
        f"extra environment: {extra_env or 'none'}; "
        + (
            f"each process pinned to one core (LOCAL_RANK mod {record['cores']} cores)"
            if args.pin
            else "not pinned"
        ),
        "",
        f"| run | 1 rank wall s | {many} wall s | ratio |",
        "|---|---|---|---|",
    ]
    for k, (a, b, r) in enumerate(zip(walls["1 rank"], walls[many], ratios, strict=True)):
        lines.append(f"| {k + 1} | {a:.1f} | {b:.1f} | {r:.2f}x |")
    lines += [
        "",
        f"median ratio **{record['median_ratio']:.2f}x**; "
        + (
            f"same shard bytes: **{same}**; ranks in the {many} report: {ranks_named}"
            if args.job == "quantize"
            else f"same widths: **{same}**; the probe's per-layer estimates differ by at most {est_rel:.1e} (relative)"
        ),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201  (a benchmark's table)
    return 0


if __name__ == "__main__":
    sys.exit(_pinned_main(sys.argv[2:]) if sys.argv[1:2] == [PINNED] else main())
