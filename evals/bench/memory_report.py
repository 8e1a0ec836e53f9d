"""The memory benchmark's report: the target's bounds (analytic), the markdown table and verdict, and the
per-phase summary of the instrumented run. See evals/bench/memory.py."""

from __future__ import annotations

from moequant.evals.bench.memory_probe import MB, SAMPLE_S


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
        # what else the pipeline keeps alive at its peak (see moequant.quantize.experts.quantize_block)
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
