"""One step of the GPU suite, in its own process (gpu_suite.py starts it with a time budget):

    python -m moequant.evals.bench.gpu_suite_child STEP --out DIR --work DIR [--dry]

Runs the step and writes its record and table (`DIR/STEP.json`, `DIR/STEP.md`) whatever happens: a step that
cannot run here (no CUDA device outside a dry run, a missing package) is recorded as skipped with the reason,
one that raises as failed with the exception's line (the traceback is in the step's log).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from moequant.evals.bench import gpu_suite_kernels, gpu_suite_quantize, gpu_suite_runtime, gpu_suite_tests
from moequant.evals.bench.gpu_suite_record import Status, StepContext, StepResult, write_record

STEPS: dict[str, tuple[str, Callable[[StepContext], StepResult]]] = {
    "gpu_tests": ("Tests marked gpu", gpu_suite_tests.run_gpu_marked),
    "quantize": ("moequant quantize on an OLMoE-shape checkpoint", gpu_suite_quantize.run),
    "kernels": ("Kernel table (evals/bench/kernels.py)", gpu_suite_kernels.run),
    "runtime": ("Fused runtime vs the torch reference, bundled model", gpu_suite_runtime.run),
    "kernel_cases": ("Triton kernel cases of tests/kernels on CUDA", gpu_suite_tests.run_kernel_cases),
}


def run_step(name: str, ctx: StepContext) -> StepResult:
    if not ctx.dry:
        try:
            import torch
        except ImportError:
            return StepResult(Status.SKIPPED, "torch is not installed")
        if not torch.cuda.is_available():
            return StepResult(
                Status.SKIPPED, "no CUDA device: this step measures the GPU (--dry runs the CPU check)"
            )
    try:
        return STEPS[name][1](ctx)
    except ImportError as exc:
        traceback.print_exc()
        return StepResult(Status.SKIPPED, f"a package is missing: {exc}")
    except Exception as exc:  # the suite goes on to the next step; the log has the traceback
        traceback.print_exc()
        return StepResult(
            Status.FAILED, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--dry", action="store_true")
    args = p.parse_args(argv)
    ctx = StepContext(Path(args.out), Path(args.work), args.dry, "cpu" if args.dry else "cuda")
    ctx.work.mkdir(parents=True, exist_ok=True)
    result = run_step(args.step, ctx)
    device = ctx.device
    if not args.dry and result.status is not Status.SKIPPED:
        import torch

        device = torch.cuda.get_device_name()
    write_record(ctx.out, args.step, STEPS[args.step][0], args.dry, device, result)
    print(f"{args.step}: {result.status.value} {result.reason}")
    return 0 if result.status is Status.OK else 1


if __name__ == "__main__":
    sys.exit(main())
