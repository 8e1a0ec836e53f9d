"""`moequant quantize` end to end on checkpoints at published per-layer shapes, inside a memory limit smaller
than the checkpoint.

    python -m moequant.evals.bench.real_shapes --shape olmoe --limit-gb 2.5       # OLMoE-1B-7B, first 4 layers
    python -m moequant.evals.bench.real_shapes --shape qwen1.5-moe --limit-gb 2.5 # Qwen1.5-MoE-A2.7B, first 3
    python -m moequant.evals.bench.real_shapes --shape olmoe --layers 1 --samples 4 --seq-len 64   # smoke run

1. Writes a random-weight bf16 checkpoint of the family at the published layer shapes (the real transformers
   config class, per-expert keys as the published checkpoints store them, one shard per layer; the byte
   tokenizer, so the embeddings are small and the bytes are the layers'), layer by layer (memory_fixture.py).
   Nothing of it is committed; the folder is deleted afterwards unless --keep.
2. Runs `moequant quantize CKPT --bits 3 --calib <bundled corpus .txt> --samples N --seq-len L` in a child
   inside a memory cgroup (cgroup v1 `memory.limit_in_bytes`, swap off: the kernel reclaims page cache and
   kills the child when its memory does not fit), every pass timed by real_shapes_child.py.
3. Records wall time per pass, the cgroup's peak usage (anonymous memory plus the page cache it charged),
   the child's peak resident set (wait4's ru_maxrss), whether the limit killed it, and the machine, in
   evals/results/bench_real_shapes_<shape>.{md,json}.

Needs root (it creates a cgroup), as this machine runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moequant.evals.bench.memory_fixture import write_calibration_text, write_synthetic_checkpoint

RESULTS = Path(__file__).resolve().parents[1] / "results"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def shape_config(shape: str, layers: int | None):
    """The transformers config of the published model, cut to its first `layers` layers, byte vocabulary."""
    if shape == "olmoe":  # allenai/OLMoE-1B-7B-0924: 16 layers
        from transformers import OlmoeConfig

        config = OlmoeConfig(
            vocab_size=256, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers or 4,
            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
            max_position_embeddings=4096, tie_word_embeddings=False,
        )  # fmt: skip
    elif shape == "qwen1.5-moe":  # Qwen/Qwen1.5-MoE-A2.7B: 24 layers
        from transformers import Qwen2MoeConfig

        config = Qwen2MoeConfig(
            vocab_size=256, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_hidden_layers=layers or 3, num_attention_heads=16,
            num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
            max_position_embeddings=8192, tie_word_embeddings=False,
        )  # fmt: skip
    else:
        raise SystemExit(f"unknown --shape {shape!r}: olmoe or qwen1.5-moe")
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # ids outside the byte vocab
    config.dtype = "bfloat16"
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit (and no swap); a child joins it before it execs."""

    def __init__(self, limit_bytes: int):
        if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
            raise SystemExit(f"no cgroup v1 memory controller at {CGROUP_ROOT}: cannot set a memory limit")
        self.path = CGROUP_ROOT / f"moequant-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = self.path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
        (self.path / "memory.swappiness").write_text("0")

    def join(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stats(self) -> dict:
        oom = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return {
            "limit_bytes": int(self.read("memory.limit_in_bytes")),
            "peak_bytes": int(self.read("memory.max_usage_in_bytes")),
            "failcnt": int(self.read("memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_limited(cmd: list[str], limit_bytes: int, log: Path, env: dict | None = None) -> dict:
    """Run `cmd` (this environment plus `env`) inside a memory cgroup of `limit_bytes`, output to `log`: exit
    status, wall seconds, wait4's peak RSS and the cgroup's statistics."""
    group = MemoryCgroup(limit_bytes)
    try:
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=group.join,
                env={**os.environ, **(env or {})},
            )
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        return {
            "rc": rc,
            "wall_s": round(wall, 1),
            "child_maxrss_bytes": usage.ru_maxrss * 1024,
        } | group.stats()
    finally:
        group.remove()


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="olmoe", help="olmoe | qwen1.5-moe")
    p.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: 4 olmoe, 3 qwen1.5-moe)"
    )
    p.add_argument("--limit-gb", type=float, default=2.5)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", default="3")
    p.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temporary folder)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args(argv)

    config = shape_config(args.shape, args.layers)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="moequant-real-"))
    ckpt, out, calib = root / "ckpt", root / "out", root / "calib.txt"
    try:
        t0 = time.perf_counter()
        sizes = write_synthetic_checkpoint(ckpt, config)
        write_calibration_text(calib)
        write_s = time.perf_counter() - t0
        times = root / "times.json"
        cmd = [sys.executable, "-m", "moequant.evals.bench.real_shapes_child", str(times), "--",
               "quantize", str(ckpt), "--bits", args.bits, "--calib", str(calib), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--out", str(out), "--quiet"]  # fmt: skip
        res = run_limited(cmd, int(args.limit_gb * 1e9), root / "child.log")
        passes = json.loads(times.read_text())["passes"] if times.exists() else []
        log_tail = (root / "child.log").read_text().splitlines()[-15:]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    completed = res["rc"] == 0
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "command": "".join(f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
        + "python -m moequant.evals.bench.real_shapes "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": args.shape,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
        | {"experts": getattr(config, "num_experts", None), "top_k": config.num_experts_per_tok},
        "checkpoint_bytes": sizes["total_bytes"],
        "expert_bytes": sizes["expert_bytes"],
        "largest_layer_bytes": max(sizes["layer_bytes"]),
        "calibration": f"{args.samples} x {args.seq_len} tokens (bundled corpus, train split)",
        "write_checkpoint_s": round(write_s, 1),
        "completed": completed,
        "result": res,
        "passes": passes,
        "log_tail": [] if completed else log_tail,
    }
    lines = [
        f"# moequant quantize at {args.shape} shapes inside a {args.limit_gb:g} GB memory limit",
        "",
        f"{record['date']}, {record['machine']}; `{record['command']}`",
        "",
        f"- checkpoint: {_gb(sizes['total_bytes'])} bf16 ({config.num_hidden_layers} layers, largest layer "
        f"{_gb(max(sizes['layer_bytes']))}), random weights at the published shapes; calibration "
        f"{record['calibration']}",
        f"- limit {_gb(res['limit_bytes'])} (cgroup v1, no swap): {'completed' if completed else 'FAILED'} "
        f"(rc {res['rc']}, OOM kills {res['oom_kills']}); cgroup peak {_gb(res['peak_bytes'])} (resident "
        f"memory plus page cache it charged), child peak RSS {_gb(res['child_maxrss_bytes'])}",
        "",
        "| pass | start (s) | wall (s) |",
        "|---|---|---|",
    ] + [
        f"| {name} | {start} | {'killed in this pass' if secs is None else secs} |"
        for name, start, secs in passes
    ]
    if not completed:
        lines += ["", "last log lines:", "", "```", *log_tail, "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    stem = f"bench_real_shapes_{args.shape}{args.tag}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1))
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
