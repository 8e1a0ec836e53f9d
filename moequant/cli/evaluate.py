"""`moequant eval`: quality of a quantized checkpoint vs its original (lm-eval, perplexity, drift, probes)."""

from __future__ import annotations

import shutil
from pathlib import Path

from moequant.cli.common import add_calib, add_common, add_revision, calib_config, command_line, local_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="quality of a quantized checkpoint vs its original: lm-eval, drift, probes"
    )
    p.add_argument("folder", help="a moequant output folder")
    p.add_argument(
        "--baseline",
        default=None,
        help="the original model: a folder or Hugging Face Hub id (default: the one quant_report.json names)",
    )
    add_revision(p, "--baseline")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks (default: moequant_ppl,moequant_cont, offline over the bundled "
        "corpus; any lm-eval task name where its data can be had; 'none' skips lm-eval)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="documents per lm-eval task and perplexity windows per domain"
    )
    p.add_argument(
        "--out", default=None, help="report folder (default <folder>/eval; the card keeps a copy there)"
    )
    add_calib(p, samples=16, seq_len=256, what="drift tokens", samples_help="calibration sequences for drift")
    p.add_argument("--probes", type=int, default=6, help="sensitivity probes, at most (0 skips; default 6)")
    p.add_argument(
        "--probe-bits", type=int, default=2, help="width the probed experts drop to (RTN, default 2)"
    )
    p.add_argument("--probe-windows", type=int, default=2, help="perplexity windows per domain per probe")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant.evals.card import write_card
    from moequant.evals.evaluate import evaluate, read_moequant_folder
    from moequant.evals.report import write_report
    from moequant.runtime.devices import resolve_device

    resolve_device(args.device)  # --device cuda without CUDA: one line, before any slow pass

    config = _eval_config(args)
    folder = Path(args.folder)
    read_moequant_folder(folder)  # refuse a wrong folder before downloading its baseline
    baseline = local_model(args, "baseline")  # a Hub id: downloaded here, before any slow pass
    report = evaluate(folder, baseline, config)
    report["command"] = command_line(args, "folder")
    out = Path(args.out) if args.out else folder / "eval"
    write_report(report, out)
    _copy_report_into(folder / "eval", out, report)
    card = write_card(folder)
    _print_summary(report)
    print(f"report: {out / 'report.md'}; model card: {card}")  # noqa: T201
    return 0


def _eval_config(args):
    """The EvalConfig of the command line (with the sensitivity probes' ProbeConfig unless --probes 0)."""
    from moequant.evals.evaluate import EvalConfig
    from moequant.evals.quality import parse_tasks
    from moequant.evals.sensitivity import ProbeConfig

    probe = None
    if args.probes > 0:
        probe = ProbeConfig(
            bits=args.probe_bits,
            experts_per_end=min(2, args.probes),
            max_probes=args.probes,
            windows=args.probe_windows,
            seq_len=args.seq_len,
        )
    return EvalConfig(
        tasks=() if args.tasks == "none" else tuple(parse_tasks(args.tasks)),
        limit=args.limit,
        lm_eval_batch_size=args.batch_size,
        calib=calib_config(args, None),  # explicit defaults: no model to size for
        seq_len=args.seq_len,
        probe=probe,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )


def _copy_report_into(in_folder: Path, out: Path, report: dict) -> None:
    """Copy the report written to `out` (with its figures) into the checkpoint's eval folder, unless it is
    that folder: the card reads its copy from the checkpoint folder."""
    if out.resolve() != in_folder.resolve():
        in_folder.mkdir(exist_ok=True)
        for f in ["report.json", "report.md", *report.get("figures", {}).values()]:
            shutil.copyfile(out / f, in_folder / f)


def _print_summary(report: dict) -> None:
    """The CLI's closing tables: lm-eval, perplexity, routing drift, and the integrity warning if any."""
    from moequant.evals.report import lm_eval_md, ppl_md

    if report.get("lm_eval"):
        print(lm_eval_md(report["lm_eval"]["rows"]))  # noqa: T201  (the CLI's closing tables)
    print("\ntoken perplexity, test split:\n" + ppl_md(report["perplexity"]))  # noqa: T201
    print(_drift_line(report["drift"]))  # noqa: T201
    integ = report.get("integrity") or {}
    if integ.get("ok") is False:
        print(  # noqa: T201
            f"WARNING: {len(integ['mismatches'])} of {integ['checked']} experts decode differently than "
            "quant_report.json recorded at quantization time (see report.md, 'Checkpoint integrity')"
        )


def _drift_line(d: dict) -> str:
    """One line on the drift: worst layer's top-k agreement, next-token KL, the expert with the largest error."""
    worst = max(
        (e for e in d["experts"] if e["rel_error"] is not None), key=lambda e: e["rel_error"], default=None
    )
    summary = (
        f"\nrouting: top-k agreement {min(r['topk_agreement'] for r in d['routing']):.4f} (worst layer), "
        f"next-token KL {d['logits_kl']:.4g} nats"
    )
    if worst:
        summary += f"; worst expert: layer {worst['layer']} expert {worst['expert']} ({worst['width']}) {worst['rel_error']:.4f}"
    return summary
