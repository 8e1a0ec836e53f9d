"""The `moequant eval`, `moequant sweep` and `moequant push` commands (registered by cli.py)."""

from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path

logger = logging.getLogger("moequant")


def _command_line(args, positional: str) -> str:
    """The command as given (options that differ from their defaults), for the reports' records."""
    from moequant.cli.main import build_parser

    defaults = vars(build_parser().parse_args([args.command, "_"]))
    words = ["moequant", args.command] + (
        [str(getattr(args, positional))] if getattr(args, positional) else []
    )
    for key, value in vars(args).items():
        if key in ("func", "command", "debug", "quiet", positional) or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def cmd_eval(args) -> int:
    from moequant.calibration.data import CalibConfig
    from moequant.evals.card import write_card
    from moequant.evals.evaluate import EvalConfig, evaluate
    from moequant.evals.quality import parse_tasks
    from moequant.evals.report import lm_eval_md, ppl_md, write_report
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
    config = EvalConfig(
        tasks=() if args.tasks == "none" else tuple(parse_tasks(args.tasks)),
        limit=args.limit,
        lm_eval_batch_size=args.batch_size,
        calib=CalibConfig(spec=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed),
        seq_len=args.seq_len,
        probe=probe,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    folder = Path(args.folder)
    report = evaluate(folder, args.baseline, config)
    report["command"] = _command_line(args, "folder")
    out = Path(args.out) if args.out else folder / "eval"
    write_report(report, out)
    in_folder = folder / "eval"
    if out.resolve() != in_folder.resolve():  # the card reads its copy from the checkpoint folder
        in_folder.mkdir(exist_ok=True)
        for f in ["report.json", "report.md", *report.get("figures", {}).values()]:
            shutil.copyfile(out / f, in_folder / f)
    card = write_card(folder)
    if report.get("lm_eval"):
        print(lm_eval_md(report["lm_eval"]["rows"]))  # noqa: T201  (the CLI's closing tables)
    print("\ntoken perplexity, test split:\n" + ppl_md(report["perplexity"]))  # noqa: T201
    d = report["drift"]
    worst = max(
        (e for e in d["experts"] if e["rel_error"] is not None), key=lambda e: e["rel_error"], default=None
    )
    summary = (
        f"\nrouting: top-k agreement {min(r['topk_agreement'] for r in d['routing']):.4f} (worst layer), "
        f"next-token KL {d['logits_kl']:.4g} nats"
    )
    if worst:
        summary += f"; worst expert: layer {worst['layer']} expert {worst['expert']} ({worst['width']}) {worst['rel_error']:.4f}"
    print(summary)  # noqa: T201
    integ = report.get("integrity") or {}
    if integ.get("ok") is False:
        print(  # noqa: T201
            f"WARNING: {len(integ['mismatches'])} of {integ['checked']} experts decode differently than "
            "quant_report.json recorded at quantization time (see report.md, 'Checkpoint integrity')"
        )
    print(f"report: {out / 'report.md'}; model card: {card}")  # noqa: T201
    return 0


def cmd_sweep(args) -> int:
    from moequant.calibration.data import CalibConfig
    from moequant.evals.quality import parse_tasks
    from moequant.evals.sweep import SweepConfig, SweepMethod, parse_bits, run_sweep
    from moequant.evals.sweep_table import sweep_md

    config = SweepConfig(
        bits=parse_bits(args.bits),
        methods=SweepMethod.parse_list(args.methods),
        tasks=() if args.tasks == "none" else tuple(parse_tasks(args.tasks)),
        limit=args.limit,
        calib=CalibConfig(spec=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed),
        group_size=args.group_size,
        batch_size=args.batch_size,
        include_original=not args.no_original,
        keep=args.keep,
        throughput=not args.no_throughput,
        device=args.device,
        progress=not args.quiet,
    )
    out = Path(args.out or f"sweep-{Path(args.model).name if args.model else 'tiny-moe'}")
    result = run_sweep(args.model, config, out, args.name, command=_command_line(args, "model"))
    print(sweep_md(result["points"]))  # noqa: T201  (the CLI's closing table)
    print(f"\n{out / (args.name + '.md')}, {args.name}.csv, {args.name}.json, {args.name}_pareto.png")  # noqa: T201
    return 0


def cmd_push(args) -> int:
    from moequant.evals.hub import push

    if not args.debug:  # the HTTP client logs every request at INFO
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    res = push(args.folder, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {res.files} files to {res.repo_url} (revision {res.revision})")  # noqa: T201
    return 0


def add_subcommands(sub, add_common) -> None:
    """Register eval, sweep and push on the `moequant` subparsers."""
    p = sub.add_parser(
        "eval", help="quality of a quantized checkpoint vs its original: lm-eval, drift, probes"
    )
    p.add_argument("folder", help="a moequant output folder")
    p.add_argument(
        "--baseline",
        default=None,
        help="the original model folder (default: the one quant_report.json names)",
    )
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
    p.add_argument(
        "--calib", default=None, help="drift tokens: bundled corpus (default), .txt/.jsonl, or HF dataset"
    )
    p.add_argument("--samples", type=int, default=16, help="calibration sequences for drift (default 16)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", type=int, default=6, help="sensitivity probes, at most (0 skips; default 6)")
    p.add_argument(
        "--probe-bits", type=int, default=2, help="width the probed experts drop to (RTN, default 2)"
    )
    p.add_argument("--probe-windows", type=int, default=2, help="perplexity windows per domain per probe")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sweep", help="quantize at several budgets/methods; size vs quality table and Pareto plot"
    )
    p.add_argument("model", nargs="?", default=None, help="model folder (default: bundled tiny MoE)")
    p.add_argument(
        "--bits", default="2.5,3,3.5,4", help="average bits per expert weight (default 2.5,3,3.5,4)"
    )
    p.add_argument("--methods", default="planned,uniform,rtn,bnb-nf4", help="planned,uniform,rtn,bnb-nf4")
    p.add_argument("--tasks", default="moequant_cont", help="lm-eval tasks per point ('none' to skip)")
    p.add_argument(
        "--limit", type=int, default=None, help="documents per lm-eval task and perplexity windows per domain"
    )
    p.add_argument("--out", default=None, help="output folder (default sweep-<model>)")
    p.add_argument(
        "--name", default="sweep", help="file name stem: <out>/<name>.csv/.json/.md, <name>_pareto.png"
    )
    p.add_argument("--calib", default=None, help="calibration data (bundled corpus by default)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--keep", action="store_true", help="keep every point's checkpoint under <out>/<name>_points/"
    )
    p.add_argument("--no-original", action="store_true", help="do not measure the unquantized model")
    p.add_argument("--no-throughput", action="store_true", help="skip the tokens/s measurement")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    add_common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("push", help="upload a quantized checkpoint folder (with its model card) to the Hub")
    p.add_argument("folder", help="a complete moequant output folder")
    p.add_argument("repo_id", help="target repository, e.g. me/Mixtral-8x7B-moequant-3b")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    add_common(p)
    p.set_defaults(func=cmd_push)
