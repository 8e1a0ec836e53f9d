"""Peak memory of `moequant quantize` on a synthetic MoE checkpoint larger than one layer by far.

    python evals/bench/memory.py                          # 8 layers x 8 experts, hidden 2048, inter 2816
    python evals/bench/memory.py --layers 2 --hidden 256 --intermediate 512 --samples 8   # smoke run

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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from moequant.evals.env_info import cpu_model, source_fingerprint

RESULTS = Path(__file__).resolve().parents[1] / "results"
MB = 1e6
SAMPLE_S = 0.05  # RSS sampling period of the parent-side sampler


# ---- synthetic checkpoint ---------------------------------------------------------------------------


def synthetic_config(hidden: int, intermediate: int, layers: int, experts: int, top_k: int, heads: int):
    from transformers import MixtralConfig

    kv_heads = max(heads // 4, 1)
    config = MixtralConfig(
        vocab_size=256,  # the byte tokenizer
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # ids outside the byte vocab
    config.dtype = "bfloat16"
    config.architectures = ["MixtralForCausalLM"]
    return config


def _init(name: str, shape, gen, hidden: int):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 4.0 / hidden**0.5 if name.endswith(".gate.weight") else 0.02  # router logits std ~4: uneven routing
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_synthetic_checkpoint(path: Path, config, seed: int = 0) -> dict:
    """A Mixtral checkpoint with random bf16 weights, written one decoder layer at a time. Returns sizes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moequant.arch import resolve
    from moequant.arch.tiny import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch, _ = resolve(skeleton)
    disk = arch.disk
    keys = dict(disk.expert_keys)
    experts_tag = f".{arch.block}.{arch.experts}."
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    del skeleton
    gen = torch.Generator().manual_seed(seed)
    H = config.hidden_size
    weight_map: dict[str, str] = {}
    sizes = {"expert_bytes": 0, "layer_bytes": [], "base_bytes": 0, "total_bytes": 0}

    def flush(shard: str, tensors: dict) -> int:
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    layer_prefix = f"{arch.layers}."
    base = {disk.to_disk(n): _init(n, s, gen, H) for n, s in shapes.items() if not n.startswith(layer_prefix)}
    sizes["base_bytes"] = flush("model-base.safetensors", base)
    del base
    for i in range(config.num_hidden_layers):
        prefix = f"{arch.layers}.{i}."
        tensors, expert_bytes = {}, 0
        for name, shape in shapes.items():
            if not name.startswith(prefix):
                continue
            if experts_tag in name:  # fused [E, 2I, H] / [E, H, I] -> per-expert keys as on disk
                mod, _, param = name.rpartition(".")
                base_key = disk.to_disk(mod)
                E = shape[0]
                for e in range(E):
                    if param == "gate_up_proj":
                        inter = shape[1] // 2
                        for part in ("gate", "up"):
                            t = _init(name, (inter, shape[2]), gen, H)
                            tensors[f"{base_key}.{keys[part].format(e=e)}"] = t
                            expert_bytes += t.numel() * 2
                    elif param == "down_proj":
                        t = _init(name, (shape[1], shape[2]), gen, H)
                        tensors[f"{base_key}.{keys['down'].format(e=e)}"] = t
                        expert_bytes += t.numel() * 2
                    else:
                        raise ValueError(f"unexpected expert parameter {name}")
            else:
                tensors[disk.to_disk(name)] = _init(name, shape, gen, H)
        sizes["layer_bytes"].append(flush(f"model-layer-{i:05d}.safetensors", tensors))
        sizes["expert_bytes"] += expert_bytes
        del tensors
    sizes["total_bytes"] = sizes["base_bytes"] + sum(sizes["layer_bytes"])
    index = {"metadata": {"total_size": sizes["total_bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return sizes


def write_calibration_text(path: Path) -> int:
    from moequant.calibration.corpus import load_split

    text = "\n\n".join(load_split("train").values())
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


# ---- RSS sampling -----------------------------------------------------------------------------------


def _tree_rss(proc) -> tuple[int, int]:
    """(rss, file-backed+shmem rss) of proc and its children, bytes."""
    import psutil

    rss = shared = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            m = p.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += m.rss
        shared += m.shared
    return rss, shared


def _vm_hwm(pid: int) -> int:
    """VmHWM (peak resident set, kept by the kernel) of a live process in bytes; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(cmd: list[str], env: dict | None = None, log_path: Path | None = None) -> dict:
    """Run cmd, sampling the RSS of its process tree every SAMPLE_S; peak, timeline and ru_maxrss."""
    import psutil

    t0 = time.perf_counter()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    proc = psutil.Process(child.pid)
    timeline = []  # (s, rss MB, anon MB)
    peak = {"rss": 0, "anon": 0, "file": 0, "t": 0.0, "hwm": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss, shared = _tree_rss(proc)
            except psutil.NoSuchProcess:
                break
            t = time.perf_counter() - t0
            timeline.append((round(t, 2), round(rss / MB, 1), round((rss - shared) / MB, 1)))
            if rss > peak["rss"]:
                peak.update(rss=rss, file=shared, t=round(t, 2))
            peak["anon"] = max(peak["anon"], rss - shared)
            peak["hwm"] = max(peak["hwm"], _vm_hwm(child.pid))
            done.wait(SAMPLE_S)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    if log_path:
        out.close()
    wall = time.perf_counter() - t0
    return {
        "cmd": cmd,
        "returncode": child.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_MB": round(peak["rss"] / MB, 1),
        "peak_rss_file_MB_at_peak": round(peak["file"] / MB, 1),
        "peak_anon_MB": round(peak["anon"] / MB, 1),
        "peak_at_s": peak["t"],
        "vm_hwm_MB": round(peak["hwm"] / MB, 1),
        "ru_maxrss_MB": round(ru.ru_maxrss * 1024 / MB, 1),  # Linux: kilobytes
        "samples": len(timeline),
        "timeline": timeline[:: max(1, len(timeline) // 400)],
    }


# ---- instrumented child -----------------------------------------------------------------------------


def _proc_status() -> tuple[int, int]:
    """(rss, anon rss) of this process from /proc/self/status, bytes."""
    vals = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:")):
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("RssAnon", 0)


def _live_tensor_bytes() -> int:
    """Bytes of distinct CPU tensor storages reachable from Python objects (meta tensors excluded)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
            key = st.data_ptr()
            if key in seen or key == 0:
                continue
            seen.add(key)
            total += st.nbytes()
        except Exception:  # noqa: BLE001 (odd tensor subclasses)
            continue
    return total


class PhaseTracker:
    """Current phase label + a 10 ms sampler thread recording the peak RSS inside each phase."""

    def __init__(self):
        self.phase = "startup"
        self.events: list[dict] = []
        self.peaks: dict[str, list[int]] = {}  # phase -> [peak rss, peak anon]
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.01)

    def _sample(self):
        rss, anon = _proc_status()
        p = self.peaks.setdefault(self.phase, [0, 0])
        p[0], p[1] = max(p[0], rss), max(p[1], anon)

    def mark(self, label: str, tensors: bool = False):
        self._sample()
        rss, anon = _proc_status()
        ev = {"t": round(time.perf_counter() - self.t0, 2), "at": label, "rss_MB": round(rss / MB, 1)}
        ev["anon_MB"] = round(anon / MB, 1)
        if tensors:
            ev["live_tensors_MB"] = round(_live_tensor_bytes() / MB, 1)
        self.events.append(ev)
        self.phase = label

    def stop(self):
        self._sample()
        self._stop.set()


class _StopBench(Exception):
    pass


def instrumented_main(out_json: str, argv: list[str]) -> int:
    """Run `moequant <argv>` with phase marks around the pipeline's steps (wrappers only)."""
    tracker = PhaseTracker()
    tracker.mark("imports", tensors=False)
    import moequant.api as api
    import moequant.checkpoint.source as source
    import moequant.checkpoint.writer as writer
    import moequant.cli.main as cli
    import moequant.quantize.experts as ql
    import moequant.quantize.passes as pipeline

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

    wrap(api, "open_source", "open_source (skeleton + base weights)", tensors_after=True)
    wrap(cli, "_calibration", "build calibration", tensors_after=True)
    wrap(pipeline, "capture_inputs", "capture layer-0 inputs", tensors_after=True)
    wrap(source.CheckpointSource, "load_layer", "load_layer", tensors_after=True, layer_arg=1)
    wrap(ql, "collect_expert_inputs", "collect expert inputs (attention fwd)", tensors_after=True)
    wrap(ql, "_gate_up_hessians", "gate/up Hessians (one chunk)", tensors_after=True)
    wrap(ql, "_down_hessians", "down-projection Hessians (one chunk)", tensors_after=True)
    wrap(ql, "quantize_stack", proj_label, tensors_after=True)
    wrap(source.CheckpointSource, "read_experts", "read a chunk's experts", layer_arg=1)
    wrap(ql, "expert_outputs", "quantized experts' outputs (for next inputs)", tensors_after=True)
    wrap(pipeline, "quantize_block", "quantize_block", tensors_after=True)
    wrap(writer.CheckpointWriter, "write_shard", "write_shard", tensors_after=False)
    wrap(pipeline, "next_inputs", "next_inputs (layer fwd)", tensors_after=True)
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


# ---- the benchmark ----------------------------------------------------------------------------------


def moequant_cmd() -> list[str]:
    exe = shutil.which("moequant")
    return [exe] if exe else [sys.executable, "-m", "moequant.cli.main"]


def bounds(config, sizes: dict, samples: int, seq_len: int) -> dict:
    """The target's bound in its variants, and what the pipeline holds besides (analytic, bytes)."""
    H, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    k = config.num_experts_per_tok
    layer_bf16 = max(sizes["layer_bytes"])
    layer_fp32 = 2 * layer_bf16
    act = samples * seq_len * H * 4  # hidden states [N, L, H] float32
    base_fp32 = 2 * sizes["base_bytes"]
    return {
        "layer_bf16": layer_bf16,
        "layer_fp32": layer_fp32,
        "activations_fp32": act,
        "bound_bf16": 1.3 * (layer_bf16 + act),
        "bound_fp32": 1.3 * (layer_fp32 + act),
        # what else the pipeline keeps alive at its peak (see quantize_layer.quantize_block)
        "expert_inputs_copy": samples * seq_len * (H * 4 + k * (8 + 4)),  # feats.x (.float() copy) + idx + w
        "hessians_gate_up": E * H * H * 4,
        "hessians_down": E * I * I * 4,
        "base_weights_fp32": base_fp32,
    }


def _growth_verdict(res: dict) -> str:
    if "increment_pass_fp32" not in res:  # the before-layers level comes from the instrumented run
        return "Growth over the before-layers level: not measured (no instrumented run, --no-phases)."
    return (
        "Growth over the before-layers level vs the same bounds: "
        f"fp32 **{'PASS' if res['increment_pass_fp32'] else 'FAIL'}**, "
        f"bf16 **{'PASS' if res['increment_pass_bf16'] else 'FAIL'}**."
    )


def markdown(res: dict) -> str:
    c, b = res["config"], res["bounds"]
    plain = res.get("plain") or res["phases_run"]  # --no-plain: the instrumented run's own sampling
    lines = [
        "# Peak memory of `moequant quantize` on a synthetic MoE checkpoint (CPU)",
        "",
        f"- date: {res['date']}",
        f"- command: `{res['command']}`",
        f"- quantize command (child, RSS sampled every {SAMPLE_S * 1000:.0f} ms with psutil, children included): "
        f"`{' '.join(res['quantize_cmd_display'])}`",
        f"- machine: {res['machine']}; torch {res['torch']}, transformers {res['transformers']}, python {res['python']}",
        f"- load average (1, 5, 15 min) before: {res['loadavg_before']}, after: {res['loadavg_after']}",
        f"- checkpoint: Mixtral, {c['layers']} layers x {c['experts']} experts (top-{c['top_k']}), hidden {c['hidden']}, "
        f"intermediate {c['intermediate']}, {c['heads']} heads, vocab 256, bf16, one shard per layer; "
        f"expert weights {res['sizes']['expert_bytes'] / 1e9:.3f} GB ({res['sizes']['expert_bytes'] / 2**30:.3f} GiB), "
        f"total {res['sizes']['total_bytes'] / 1e9:.3f} GB; built in {res['build_s']:.0f} s",
        f"- calibration: {c['samples']} x {c['seq_len']} tokens from a local .txt (bundled corpus, train split)",
        *[
            f"- library source of the {k.removeprefix('source_')} run: {v}"
            for k, v in res.items()
            if k.startswith("source_")
        ],
        *(
            []
            if res.get("plain")
            else [
                f"- no plain run (--no-plain): the figures below are the instrumented run's, which stops after "
                f"{c.get('phase_layers', 2)} layers"
                + (" and calls malloc_trim(0) after each layer" if c.get("malloc_trim") else "")
                + (f"; what-if patches in the child: {c['what_if']}" if c.get("what_if") else "")
            ]
        ),
        "",
        "| quantity | MB |",
        "|---|---|",
        f"| one layer, bf16 (as stored) | {b['layer_bf16'] / MB:.1f} |",
        f"| one layer, fp32 (compute copy) | {b['layer_fp32'] / MB:.1f} |",
        f"| calibration hidden states N x L x H x 4 | {b['activations_fp32'] / MB:.1f} |",
        f"| **bound, bf16 count**: 1.3 x (layer bf16 + activations) | {b['bound_bf16'] / MB:.1f} |",
        f"| **bound, fp32 count**: 1.3 x (layer fp32 + activations) | {b['bound_fp32'] / MB:.1f} |",
        f"| process after imports (torch, transformers, moequant), no weights | {res.get('baseline_MB', float('nan')):.1f} |",
        f"| process just before the first layer is read (runtime, skeleton, base weights, layer-0 inputs) | {res.get('before_layers_MB', float('nan')):.1f} |",
        f"| **peak RSS** (sampled, process tree) | {plain['peak_rss_MB']:.1f} |",
        f"| peak for the verdict: max(sampled peak, VmHWM) | {res.get('verdict_peak_MB', plain['peak_rss_MB']):.1f} |",
        f"| that peak minus the before-layers level | {res.get('verdict_peak_MB', plain['peak_rss_MB']) - res.get('before_layers_MB', float('nan')):.1f} |",
        f"| of which file-backed at the peak (safetensors mmaps) | {plain['peak_rss_file_MB_at_peak']:.1f} |",
        f"| peak anonymous RSS | {plain['peak_anon_MB']:.1f} |",
        f"| VmHWM of the child (kernel high-water mark, exact) | {plain.get('vm_hwm_MB', float('nan')):.1f} |",
        f"| ru_maxrss of the child (includes this benchmark's own image, inherited at spawn) | {plain['ru_maxrss_MB']:.1f} |",
        f"| wall time of the quantize run | {plain['wall_s']:.1f} s |",
        "",
        f"Verdict: peak RSS {res.get('verdict_peak_MB', plain['peak_rss_MB']):.0f} MB vs bound {b['bound_fp32'] / MB:.0f} MB (fp32 count): "
        f"**{'PASS' if res['pass_fp32'] else 'FAIL'}**; vs {b['bound_bf16'] / MB:.0f} MB (bf16 count): "
        f"**{'PASS' if res['pass_bf16'] else 'FAIL'}**. " + _growth_verdict(res),
        "",
    ]
    if res.get("phases"):
        lines += [
            "## Where the memory goes (instrumented run, RSS at phase boundaries)",
            "",
            f"Instrumented run (same command, stopped after the first {res['config'].get('phase_layers', 2)} "
            f"layers): wall {res['phases_run']['wall_s']:.1f} s, sampled peak {res['phases_run']['peak_rss_MB']:.1f} MB.",
            "'live tensors' = distinct CPU tensor storages reachable from Python at the boundary.",
            "",
            "| phase (first MoE layer shown; all layers in the JSON) | peak RSS inside MB | peak anon MB | RSS after MB | anon after MB | live tensors after MB |",
            "|---|---|---|---|---|---|",
        ]
        for row in res["phase_rows"]:
            lines.append(
                f"| {row['phase']} | {row['peak_rss_MB']} | {row['peak_anon_MB']} | {row['rss_after_MB']} | "
                f"{row['anon_after_MB']} | {row.get('live_tensors_MB', '')} |"
            )
        lines += [
            "",
            "Across layers (state after each layer is released; a steady pipeline returns to the same level):",
            "",
            "| after | RSS MB | anon MB | live tensors MB |",
            "|---|---|---|---|",
        ]
        for e in res["phases"]["events"]:
            if " after release_layer" in e["at"] or " after what-if" in e["at"] or "malloc_trim" in e["at"]:
                lines.append(
                    f"| {e['at']} | {e['rss_MB']} | {e['anon_MB']} | {e.get('live_tensors_MB', '')} |"
                )
        lines.append("")
    if res.get("findings"):
        lines += ["## Findings", "", *res["findings"], ""]
    return "\n".join(lines)


def summarize_phases(phases: dict, layer: int) -> list[dict]:
    """One row per phase of layer `layer` (and the run-level phases): peak inside and state after."""
    ev = phases["events"]
    peaks = phases["phase_peaks"]
    rows = []
    for i, e in enumerate(ev):
        lab = e["at"]
        if lab.startswith("L") and not lab.startswith((f"L{layer} ", "LNone ")):
            continue
        if " after " in lab or lab in ("end",):
            continue
        after = ev[i + 1] if i + 1 < len(ev) else e
        p = peaks.get(lab, {"rss_MB": e["rss_MB"], "anon_MB": e["anon_MB"]})
        gap_label = after["at"]
        row = {
            "phase": lab.split(" ", 1)[1] if lab.startswith("L") else lab,
            "peak_rss_MB": p["rss_MB"],
            "peak_anon_MB": p["anon_MB"],
            "rss_after_MB": after["rss_MB"],
            "anon_after_MB": after["anon_MB"],
        }
        if "live_tensors_MB" in after:
            row["live_tensors_MB"] = after["live_tensors_MB"]
        rows.append(row)
        # the span between 'after X' and the next phase (e.g. the down-projection Hessian loop)
        gp = peaks.get(gap_label)
        if gap_label.startswith(f"L{layer} after gptq gate_up") and gp:
            rows.append(
                {
                    "phase": "down-projection Hessians (between the two GPTQ calls)",
                    "peak_rss_MB": gp["rss_MB"],
                    "peak_anon_MB": gp["anon_MB"],
                    "rss_after_MB": "",
                    "anon_after_MB": "",
                }
            )
    return rows


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
        "command": "python evals/bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
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
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
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
