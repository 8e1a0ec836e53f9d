"""The GPU suite's quantize step: `moequant quantize --device cuda` end to end on an OLMoE-shape checkpoint.

Writes a random-weight bf16 checkpoint at OLMoE-1B-7B layer shapes (real_shapes.shape_config, written tensor
by tensor by memory_fixture.write_synthetic_checkpoint) into the scratch folder, runs `moequant quantize` in
this process with every pass timed (real_shapes_child.main), and records the pass times, the peak device
memory (torch.cuda.max_memory_allocated / _reserved over the whole command) and the host's peak RSS.
Dry: a 2-layer OLMoE-shape checkpoint at tiny widths, on CPU.
"""

from __future__ import annotations

import json
import resource
import time

from moequant.evals.bench.gpu_suite_record import Status, StepContext, StepResult

GPU_SIZES = {"layers": 4, "samples": 32, "seq_len": 512}  # the CPU record's run (bench_real_shapes_olmoe.md)
DRY_SIZES = {"layers": 2, "samples": 16, "seq_len": 64}
DRY_DIMS = {  # OLMoE's structure (64 -> 8 experts, top-8 -> top-2) at widths a CPU runs in seconds
    "hidden_size": 64, "intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4,
}  # fmt: skip


def checkpoint_config(dry: bool):
    from moequant.evals.bench.real_shapes import shape_config

    sizes = DRY_SIZES if dry else GPU_SIZES
    config = shape_config("olmoe", sizes["layers"])
    if dry:
        for key, value in DRY_DIMS.items():
            setattr(config, key, value)
    return config


def _shown(argv: list[str], names: dict) -> list[str]:
    """argv with the scratch paths replaced by their names (the record holds no machine's paths)."""
    names = {str(k): v for k, v in names.items()}
    return [names.get(a, a) for a in argv]


def run(ctx: StepContext) -> StepResult:
    import torch

    from moequant.evals.bench import real_shapes_child
    from moequant.evals.bench.memory_fixture import write_calibration_text, write_synthetic_checkpoint

    sizes = DRY_SIZES if ctx.dry else GPU_SIZES
    config = checkpoint_config(ctx.dry)
    ckpt, calib, out = (ctx.work / n for n in ("olmoe", "calib.txt", "olmoe-q"))
    times = ctx.out / "logs" / "quantize_times.json"  # rewritten as each pass starts and ends: a run killed
    times.parent.mkdir(parents=True, exist_ok=True)  # at its budget still says which pass it was in
    t0 = time.perf_counter()
    written = write_synthetic_checkpoint(ckpt, config)
    write_calibration_text(calib)
    write_s = time.perf_counter() - t0
    argv = ["quantize", str(ckpt), "--bits", "3", "--calib", str(calib), "--samples", str(sizes["samples"]),
            "--seq-len", str(sizes["seq_len"]), "--device", ctx.device, "--out", str(out), "--quiet"]  # fmt: skip
    cuda = ctx.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rc = real_shapes_child.main([str(times), "--", *argv])
    passes = json.loads(times.read_text())["passes"] if times.is_file() else []
    peak_alloc = torch.cuda.max_memory_allocated() if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved() if cuda else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    notes = (
        f"checkpoint: OLMoE-1B-7B structure, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, random bf16 weights, "
        f"{written['total_bytes'] / 1e6:.1f} MB, written in {write_s:.1f} s",
        f"command: `moequant {' '.join(_shown(argv, {ckpt: 'CKPT', calib: 'CALIB.txt', out: 'OUT'}))}`",
        f"calibration: {sizes['samples']} x {sizes['seq_len']} tokens of the bundled corpus (train split)",
        "peak device memory (whole command): "
        + (
            f"{peak_alloc / 1e9:.3f} GB allocated, {peak_reserved / 1e9:.3f} GB reserved"
            if cuda
            else "n/a (CPU)"
        ),
        f"peak host RSS of the step's process (checkpoint writing included): {rss / 1e9:.3f} GB",
    )
    rows = tuple((name, start, secs) for name, start, secs in passes)
    status = Status.OK if rc == 0 else Status.FAILED
    reason = (
        f"quantized in {passes[-1][2]} s" if rc == 0 and passes else f"moequant quantize exit status {rc}"
    )
    return StepResult(status, reason, ("pass", "start (s)", "wall (s)"), rows, notes)
