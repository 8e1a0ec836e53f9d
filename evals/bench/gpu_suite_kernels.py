"""The GPU suite's kernel step: the kernel table of evals/bench/kernels.py.

On a GPU: kernels.main at the suite's shapes, batches and formats (its full table goes to `<out>/kernels/`),
summarised in the step's table. Dry: Triton's timings need CUDA (CUDA graphs and events; the CPU interpreter's
timings are not performance numbers), so the dry table runs the same layer builder, routing, traffic count,
bf16 baseline and table writer of kernels.py at one tiny shape on CPU, the quantized layer through the torch
reference path, timed by the wall clock.
"""

from __future__ import annotations

import json
import time

from moequant.evals.bench.gpu_suite_record import Status, StepContext, StepResult

GPU_ARGS = [
    "--shapes",
    "mixtral,qwen3",
    "--batches",
    "1,16,256,4096",
    "--formats",
    "int4,int3,int2,int8,mixed",
]
DRY_SHAPE = (256, 128, 8, 2)  # hidden, intermediate, experts, top-k
DRY_BATCHES = (1, 16)
DRY_FORMATS = ("int4", "mixed")
COLUMNS = ("shape", "batch", "format", "path", "time us", "% floor", "vs bf16", "max rel err")


def _row(r: dict) -> tuple:
    return tuple(r[k] for k in ("shape", "batch", "format", "path")) + (
        round(r["time_us"], 1),
        round(r["pct_floor"], 1),
        round(r["vs_bf16"], 2),
        r["max_rel_err"],
    )


def run(ctx: StepContext) -> StepResult:
    return _dry(ctx) if ctx.dry else _gpu(ctx)


def _gpu(ctx: StepContext) -> StepResult:
    try:
        import triton  # noqa: F401
    except ImportError:
        return StepResult(Status.SKIPPED, "triton is not installed: the kernels cannot run")
    from moequant.evals.bench import kernels

    folder = ctx.out / "kernels"
    rc = kernels.main([*GPU_ARGS, "--out", str(folder)])
    files = sorted(folder.glob("bench_kernels_*.json"))
    if rc != 0 or not files:
        return StepResult(
            Status.FAILED, f"evals/bench/kernels.py exit status {rc}, table written: {bool(files)}"
        )
    table = json.loads(files[-1].read_text())
    notes = (
        (f"command: `python -m moequant.evals.bench.kernels {' '.join(GPU_ARGS)}`",)
        + tuple(f"{k}: {v}" for k, v in table["meta"].items() if k != "command")
        + (f"full table: kernels/{files[-1].with_suffix('.md').name}",)
    )
    rows = tuple(_row(r) for r in table["rows"])
    return StepResult(Status.OK, f"{len(rows)} rows", COLUMNS, rows, notes)


def _copy_bandwidth_cpu(nbytes: int = 64 << 20) -> float:
    """Host memory copy bandwidth (bytes read + written per second), best of 5: the dry table's floor."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _wall(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _dry(ctx: StepContext) -> StepResult:
    import torch

    from moequant.arch.base import Activation
    from moequant.evals.bench import kernels
    from moequant.kernels import quantized_moe
    from moequant.kernels.reference import moe_reference

    kernels.SHAPES["dry"] = DRY_SHAPE
    bw = _copy_bandwidth_cpu()
    rows = []
    for fmt in DRY_FORMATS:
        packed = kernels.build_layer("dry", fmt, "cpu")
        gu, dn = kernels.dense_weights(packed)
        for batch in DRY_BATCHES:
            idx, w = kernels.routing("dry", batch, "cpu")
            x = torch.randn(batch, DRY_SHAPE[0], generator=torch.Generator().manual_seed(batch))
            tr = kernels.traffic(packed, idx, torch.float32)
            run = lambda x=x, idx=idx, w=w, packed=packed: quantized_moe(  # noqa: E731
                x, idx, w, packed, Activation.SILU_GLU, backend="reference"
            )
            t = _wall(run)
            y, ref = run(), moe_reference(x, idx, w, packed, Activation.SILU_GLU)
            err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            bf16_t = _wall(kernels.bf16_loop(x.to(torch.bfloat16), idx, w, gu, dn))
            floor = kernels.floor_seconds(tr, bw)
            row = kernels.Row(
                shape="dry", batch=batch, format=fmt, path="reference (CPU, dry)", time_us=t * 1e6,
                touched=tr.touched_experts, weight_mb=tr.weight_bytes / 1e6, floor_us=floor * 1e6,
                pct_floor=100 * floor / t, achieved_gbs=tr.weight_bytes / t / 1e9, bf16_us=bf16_t * 1e6,
                vs_bf16=bf16_t / t, vs_bytes=None, tflops=tr.flops / t / 1e12, max_rel_err=err,
            )  # fmt: skip
            rows.append(row)
    meta = {
        "device": "cpu (dry)",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m moequant.evals.bench.gpu_suite --dry",
        "shape": f"hidden {DRY_SHAPE[0]}, intermediate {DRY_SHAPE[1]}, {DRY_SHAPE[2]} experts, top-{DRY_SHAPE[3]}",
    }
    folder = ctx.out / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_kernels_dry.md").write_text(kernels.markdown(rows, meta))
    notes = (
        "Triton kernel timings need CUDA (graphs, events): the dry table times the torch reference path by the "
        "wall clock at a tiny shape, through kernels.py's layer builder, routing, traffic and table writer",
        "full table: kernels/bench_kernels_dry.md",
    )
    table = tuple(_row(vars(r)) for r in rows)
    return StepResult(Status.OK, f"{len(table)} rows (reference path, dry)", COLUMNS, table, notes)
