"""The GPU suite's runtime step: the fused Triton path against the torch reference on the bundled model.

Quantizes the bundled tiny MoE (planned 3 bits: experts at several widths), loads it with transformers after
`import moequant` in bf16 on the GPU, and runs each input batch through every QuantizedExperts module twice:
the fused kernels (`kernel = "triton"`) and the torch reference (`kernel = "reference"`). Records the logits'
max |fused - reference| / max |reference|, the top-1 agreement, and tokens/s of each path
(evals/throughput.tokens_per_second). Dry: float32 on CPU with the kernels under the Triton interpreter
(TRITON_INTERPRET=1, set by the suite for this step; the interpreter computes bf16 wrongly), one small batch.
"""

from __future__ import annotations

import time

from moequant.evals.bench.gpu_suite_record import Status, StepContext, StepResult

QUANTIZE = "--bits 3 --samples 16 --seq-len 128 --no-layer-probe --quiet".split()
GPU_BATCHES = ((1, 1), (8, 1), (4, 256))  # (batch, tokens): decode at 1 and 8 sequences, one prefill
DRY_BATCHES = ((1, 16),)
# max |fused - reference| / max |reference| allowed (bf16: tests/kernels' bf16 tolerance)
TOL = {"bfloat16": 5e-2, "float32": 1e-3}
COLUMNS = ("batch x tokens", "dtype", "max rel err", "top-1 agree", "fused tok/s", "reference tok/s")


def _set_path(model, kernel: str) -> int:
    from moequant.modules.qexperts import QuantizedExperts

    mods = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for m in mods:
        m.kernel = kernel
    return len(mods)


def _rate(model, batch: int, tokens: int, dry: bool) -> int | None:
    """Tokens/s of the path set now; none dry (the interpreter's speed means nothing, a forward takes seconds)."""
    from moequant.evals.throughput import tokens_per_second

    return None if dry else round(tokens_per_second(model, batch=batch, seq_len=tokens, repeats=5))


def run(ctx: StepContext) -> StepResult:
    import torch

    import moequant  # noqa: F401  (registers the moequant format with transformers)
    from moequant.calibration.corpus import load_split
    from moequant.cli.main import main as cli_main

    calib, folder = ctx.work / "small_calib.txt", ctx.work / "tiny-moe-q"
    calib.write_text("\n\n".join(text[:10_000] for text in load_split("train").values()))
    t0 = time.perf_counter()
    argv = ["quantize", *QUANTIZE, "--calib", str(calib), "--device", ctx.device, "--out", str(folder)]
    rc = cli_main(argv)
    if rc != 0:
        return StepResult(Status.FAILED, f"moequant quantize of the bundled model: exit status {rc}")
    quantize_s = time.perf_counter() - t0

    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if ctx.dry else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=ctx.device).eval()
    n_modules = _set_path(model, "reference")
    vocab = int(model.config.vocab_size)
    tol = TOL[str(dtype).removeprefix("torch.")]
    rows, worst = [], 0.0
    for batch, tokens in DRY_BATCHES if ctx.dry else GPU_BATCHES:
        ids = torch.randint(
            0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(batch * tokens)
        )
        ids = ids.to(ctx.device)
        logits, rates = {}, {}
        for path in ("reference", "triton"):
            _set_path(model, path)
            with torch.no_grad():
                logits[path] = model(input_ids=ids, use_cache=False).logits.float()
            rates[path] = _rate(model, batch, tokens, ctx.dry)
        ref, fused = logits["reference"], logits["triton"]
        err = ((fused - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        agree = (fused.argmax(-1) == ref.argmax(-1)).float().mean().item()
        worst = max(worst, err)
        rows.append((f"{batch} x {tokens}", str(dtype).removeprefix("torch."), err, round(agree, 4),
                     rates["triton"], rates["reference"]))  # fmt: skip
    notes = (
        f"bundled tiny MoE quantized with `moequant quantize {' '.join(QUANTIZE)} --device {ctx.device}` "
        f"in {quantize_s:.1f} s; {n_modules} QuantizedExperts modules",
        f"fused path: {'Triton interpreter on CPU (dry)' if ctx.dry else 'Triton on ' + ctx.device}; "
        f"tolerance on max rel err {tol:g}",
    )
    status = Status.OK if worst <= tol else Status.FAILED
    return StepResult(
        status, f"worst max rel err {worst:.2e} (tolerance {tol:g})", COLUMNS, tuple(rows), notes
    )
