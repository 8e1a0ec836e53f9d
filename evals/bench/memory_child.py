"""The memory benchmark's instrumented child: runs `moequant <argv>` with phase marks around the quantize
pipeline's steps (module attributes wrapped in this process only, the library unchanged) and writes the phase
events and per-phase peaks to a JSON file. See evals/bench/memory.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moequant.evals.bench.memory_probe import MB, PhaseTracker


class _StopBench(Exception):
    pass


def instrumented_main(out_json: str, argv: list[str]) -> int:
    """Run `moequant <argv>` with phase marks around the pipeline's steps (wrappers only)."""
    tracker = PhaseTracker()
    tracker.mark("imports", tensors=False)
    import moequant.api as api
    import moequant.calibration.stream as stream
    import moequant.checkpoint.source as source
    import moequant.checkpoint.writer as writer
    import moequant.cli.main as cli
    import moequant.cli.quantize as cli_quantize
    import moequant.plan.planner as planner
    import moequant.quantize.experts as ql
    import moequant.quantize.layer_pass as layer_pass
    import moequant.quantize.run as qrun

    tracker.mark("after imports", tensors=True)
    state = {"layer": None, "proj": 0}

    def wrap(owner, name, label, tensors_after=False, layer_arg=None):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if layer_arg is not None:
                state["layer"] = args[layer_arg]
            lab = label() if callable(label) else label
            tracker.mark(f"L{state['layer']} {lab}")
            out = fn(*args, **kwargs)
            tracker.mark(f"L{state['layer']} after {lab}", tensors=tensors_after)
            return out

        setattr(owner, name, wrapper)

    def proj_label():
        state["proj"] += 1
        return "gptq gate_up (one chunk)" if state["proj"] % 2 == 1 else "gptq down (one chunk)"

    # each wrap replaces a module attribute, so it patches the namespace the caller looks the name up in
    for mod in (api, qrun, planner):  # the quantize run opens its source in moequant.quantize.run
        wrap(mod, "open_source", "open_source (skeleton + base weights)", tensors_after=True)
    wrap(cli_quantize, "calibration", "build calibration", tensors_after=True)
    wrap(stream, "capture_inputs", "capture layer-0 inputs", tensors_after=True)  # from stream.first_inputs
    wrap(source.CheckpointSource, "load_layer", "load_layer", tensors_after=True, layer_arg=1)
    wrap(ql, "collect_expert_inputs", "collect expert inputs (attention fwd)", tensors_after=True)
    wrap(ql, "gate_up_hessians", "gate/up Hessians (one chunk)", tensors_after=True)
    wrap(ql, "down_hessians", "down-projection Hessians (one chunk)", tensors_after=True)
    wrap(ql, "quantize_stack", proj_label, tensors_after=True)
    wrap(source.CheckpointSource, "read_experts", "read a chunk's experts", layer_arg=1)
    wrap(ql, "expert_outputs", "quantized experts' outputs (for next inputs)", tensors_after=True)
    wrap(layer_pass, "quantize_block", "quantize_block", tensors_after=True)
    wrap(writer.CheckpointWriter, "write_shard", "write_shard", tensors_after=False)
    wrap(stream, "next_inputs", "next_inputs (layer fwd)", tensors_after=True)
    wrap(source.CheckpointSource, "release_layer", "release_layer", tensors_after=True, layer_arg=1)

    # every decoder layer has the same shapes, so the per-phase picture of the first few layers is the
    # picture of all of them; stopping there keeps the instrumented run short (the plain run covers all)
    max_layers = int(os.environ.get("BENCH_MEMORY_PHASE_LAYERS", "2"))
    released = source.CheckpointSource.release_layer

    trim = os.environ.get("BENCH_MEMORY_MALLOC_TRIM") == "1"  # experiment: is the growth allocator retention?

    # what-if experiments (patches in this child only, the library is unchanged): the two leaks found
    whatif = set(filter(None, os.environ.get("BENCH_MEMORY_WHATIF", "").split(",")))

    def release_and_maybe_stop(self, i):
        released(self, i)
        if "release_original" in whatif:  # the fused experts quantize_pass swapped out, still held by blocks
            for b in self.blocks:
                if b.layer_idx == i:
                    b.experts.to("meta")
        if "close_handles" in whatif:  # drop the safetensors mmaps of the files read so far
            self._handles.clear()
        if whatif:
            tracker.mark(f"L{i} after what-if release ({','.join(sorted(whatif))})", tensors=True)
        if trim:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            tracker.mark(f"L{i} after malloc_trim(0)")
        if max_layers > 0 and i + 1 >= max_layers:
            raise _StopBench

    source.CheckpointSource.release_layer = release_and_maybe_stop
    rc = 1
    try:
        rc = cli.main(argv)
    except _StopBench:
        tracker.mark(f"stopped after {max_layers} layers")
        rc = 0
    finally:
        tracker.mark("end", tensors=True)
        tracker.stop()
        peaks = {
            k: {"rss_MB": round(v[0] / MB, 1), "anon_MB": round(v[1] / MB, 1)}
            for k, v in tracker.peaks.items()
        }
        Path(out_json).write_text(json.dumps({"events": tracker.events, "phase_peaks": peaks}, indent=1))
    return rc
