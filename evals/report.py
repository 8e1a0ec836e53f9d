"""The eval report: report.json (everything), report.md (tables) and PNG figures, from one dict.

Also the small markdown-table helpers the model card and the sweep reuse.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

FIGURES = {"drift_heatmap": "drift_heatmap.png", "routing_drift": "routing_drift.png"}
MAX_EXPERT_ROWS = 256  # report.md lists every expert up to this many, else the worst ones


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e5:
            return f"{v:.3e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}" if n / div < 100 else f"{n / div:.0f} {unit}"
    return f"{int(n)} B"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pm(value, stderr) -> str:
    return fmt(value) if stderr is None else f"{fmt(value)} ± {fmt(stderr, 2)}"


def lm_eval_rows(baseline: dict, quantized: dict) -> list[dict]:
    """Per (task, metric): both scores, stderr, delta and relative delta (`run_lm_eval` outputs as JSON)."""
    from moequant.evals.quality import lower_is_better

    rows = []
    for task in sorted(set(baseline) | set(quantized)):
        b, q = baseline.get(task, {}), quantized.get(task, {})
        for metric in sorted(set(b) | set(q)):
            if metric == "sample_len":
                continue
            bv, qv = b.get(metric, {}).get("value"), q.get(metric, {}).get("value")
            delta = None if bv is None or qv is None else qv - bv
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "baseline": bv,
                    "baseline_stderr": b.get(metric, {}).get("stderr"),
                    "quantized": qv,
                    "quantized_stderr": q.get(metric, {}).get("stderr"),
                    "delta": delta,
                    "rel_delta": None if delta is None or not bv else delta / abs(bv),
                    "lower_is_better": lower_is_better(metric),
                    "samples": int(q.get("sample_len", b.get("sample_len", {})).get("value", 0) or 0),
                }
            )
    return rows


def lm_eval_md(rows: list[dict]) -> str:
    return md_table(
        ["task", "metric", "n", "baseline", "quantized", "delta", "delta %"],
        [
            [
                r["task"],
                r["metric"] + (" ↓" if r["lower_is_better"] else " ↑"),
                r["samples"],
                _pm(r["baseline"], r["baseline_stderr"]),
                _pm(r["quantized"], r["quantized_stderr"]),
                None if r["delta"] is None else f"{r['delta']:+.4g}",
                None if r["rel_delta"] is None else f"{100 * r['rel_delta']:+.2f}%",
            ]
            for r in rows
        ],
    )


def ppl_md(ppl: dict) -> str:
    b, q = ppl["baseline"], ppl["quantized"]
    return md_table(
        ["domain", "baseline", "quantized", "delta %"],
        [[d, b[d], q[d], f"{100 * (q[d] / b[d] - 1):+.2f}%"] for d in b],
    )


def routing_md(rows: list[dict]) -> str:
    return md_table(
        ["layer", "tokens", "top-k agreement", "top-1 agreement", "identical top-k", "router KL (nats)"],
        [
            [r["layer"], r["tokens"], r["topk_agreement"], r["top1_agreement"], r["exact_match"], r["kl"]]
            for r in rows
        ],
    )


def experts_md(rows: list[dict]) -> str:
    shown = rows
    note = ""
    if len(rows) > MAX_EXPERT_ROWS:
        shown = sorted(rows, key=lambda r: -(r["rel_error"] or 0))[:MAX_EXPERT_ROWS]
        note = f"\n\nThe {MAX_EXPERT_ROWS} largest errors of {len(rows)} experts; all are in report.json."
    return (
        md_table(
            ["layer", "expert", "routed tokens", "width", "rel. output error"],
            [[r["layer"], r["expert"], r["tokens"], r["width"], r["rel_error"]] for r in shown],
        )
        + note
    )


def probes_md(sens: dict) -> str:
    head = (
        f"Only the probed experts are pushed to {sens['bits']}-bit RTN (group size {sens['group_size']}) inside "
        f"the original model; token perplexity on the test split. Cost bound: {sens['cost_bound']}. "
        f"Baseline perplexity: {fmt(sens['baseline_ppl'])}.\n\n"
    )
    return head + md_table(
        ["probe", "layer", "experts", "routed tokens", "perplexity", "delta", "delta %"],
        [
            [
                p["reason"],
                p["layer"],
                "all" if p["kind"] == "layer" else ",".join(map(str, p["experts"])),
                p["tokens"],
                p["ppl"],
                f"{p['delta']:+.4g}",
                f"{100 * p['rel_delta']:+.2f}%",
            ]
            for p in sens["probes"]
        ],
    )


def render_md(report: dict) -> str:
    """report.md: a header, the integrity verdict, then one section per measurement the report holds."""
    parts = _header_md(report)
    parts += _integrity_md(report.get("integrity") or {})
    if report.get("lm_eval"):
        parts += _lm_eval_section(report["lm_eval"])
    if report.get("perplexity"):
        parts += _ppl_section(report["perplexity"])
    if report.get("drift"):
        parts += _drift_section(report["drift"])
    if report.get("sensitivity"):
        parts += ["## Sensitivity probe", "", probes_md(report["sensitivity"]), ""]
    return "\n".join(parts).replace("\n\n\n", "\n\n")


def _header_md(report: dict) -> list[str]:
    """The title and the lines naming both models, their sizes, date, machine, run time and command."""
    s = report["sizes"]
    return [
        "# moequant eval report",
        "",
        f"- quantized: `{report['quantized']}` ({human_bytes(s['quantized_bytes'])} of weight files, "
        f"{fmt(s.get('average_bits'), 4)} bits per expert weight)",
        f"- baseline: `{report['baseline']}` ({human_bytes(s['baseline_bytes'])} of weight files)",
        f"- date: {report['date']}; machine: {report['machine']}; {fmt(report['seconds'], 3)} s",
        f"- command: `{report['command']}`" if report.get("command") else "",
        "",
    ]


def _integrity_md(integ: dict) -> list[str]:
    """A warning section with the first 32 mismatches when the checkpoint decodes differently than it was
    written, one line when every expert decodes as recorded, nothing when the check did not run."""
    if integ.get("ok") is False:
        bad = integ["mismatches"]
        return [
            "## ⚠ Checkpoint integrity",
            "",
            f"{len(bad)} of {integ['checked']} experts decode to weights whose error against the baseline differs "
            "from the `rel_weight_error` quant_report.json recorded when they were written: the checkpoint is "
            "read differently than it was written (or the baseline is not the model it was quantized from). "
            "The numbers below describe the model as it loads now.",
            "",
            md_table(
                ["layer", "expert", "recorded error", "decoded error"],
                [[b["layer"], b["expert"], b["recorded"], b["decoded"]] for b in bad[:32]],
            ),
            "",
        ]
    if integ.get("ok"):
        return [
            f"Checkpoint integrity: all {integ['checked']} experts decode to the weight error recorded at "
            "quantization time.",
            "",
        ]
    return []


def _lm_eval_section(cfg: dict) -> list[str]:
    """The lm-eval section: tasks and limit, then the score table."""
    return [
        "## lm-eval",
        "",
        f"Tasks: {', '.join(cfg['tasks'])}; limit {cfg['limit'] or 'none'} documents per task. "
        "↓ lower is better, ↑ higher is better; ± is lm-eval's standard error (none for perplexities).",
        "",
        lm_eval_md(cfg["rows"]),
        "",
    ]


def _ppl_section(p: dict) -> list[str]:
    """The token-perplexity section: windows and their length, then the per-domain table."""
    return [
        "## Token perplexity (bundled corpus, test split)",
        "",
        f"{p['windows'] or 'all'} window(s) of {p['seq_len']} tokens per domain.",
        "",
        ppl_md(p),
        "",
    ]


def _drift_section(d: dict) -> list[str]:
    """The routing drift per layer and the per-expert drift sections, with their figures."""
    return [
        "## Routing drift per layer",
        "",
        f"Both full models on the same {d['tokens']} calibration tokens ({d['calibration']}); the quantized "
        "model's router sees the quantized upstream layers. Next-token distributions: mean KL "
        f"{fmt(d['logits_kl'])} nats, argmax agreement {fmt(d['next_token_agreement'])}.",
        "",
        routing_md(d["routing"]),
        "",
        f"![routing drift]({FIGURES['routing_drift']})",
        "",
        "## Per-expert drift",
        "",
        "Relative output error ||y_q - y|| / ||y|| of each quantized expert on the original model's inputs "
        "and routing (the expert's own quantization error).",
        "",
        f"![drift heatmap]({FIGURES['drift_heatmap']})",
        "",
        experts_md(d["experts"]),
        "",
    ]


def write_figures(report: dict, out_dir: Path) -> dict[str, str]:
    from moequant.evals import plots

    d = report.get("drift")
    if not d:
        return {}
    layers = sorted({e["layer"] for e in d["experts"]})
    n_e = max(e["expert"] for e in d["experts"]) + 1
    err = [[math.nan] * n_e for _ in layers]
    lab = [[""] * n_e for _ in layers]
    tok = [[0] * n_e for _ in layers]
    for e in d["experts"]:
        i = layers.index(e["layer"])
        err[i][e["expert"]] = math.nan if e["rel_error"] is None else e["rel_error"]
        lab[i][e["expert"]] = e["width"]
        tok[i][e["expert"]] = e["tokens"]
    plots.drift_heatmap(layers, err, lab, tok, out_dir / FIGURES["drift_heatmap"])
    plots.routing_drift(d["routing"], out_dir / FIGURES["routing_drift"])
    return dict(FIGURES)


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["figures"] = write_figures(report, out)
    except Exception as err:  # a plotting failure must not lose the numbers
        logger.warning("could not draw the eval figures (%s: %s)", type(err).__name__, err)
        report["figures"] = {}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(render_md(report))
    return out / "report.json"
