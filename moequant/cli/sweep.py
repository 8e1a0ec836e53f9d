"""`moequant sweep`: quantize at several budgets and methods; size vs quality table and Pareto plot."""

from __future__ import annotations

from pathlib import Path

from moequant.cli.common import (
    MODEL_HELP,
    add_calib,
    add_common,
    add_revision,
    calib_config,
    command_line,
    local_model,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="quantize at several budgets/methods; size vs quality table and Pareto plot"
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_revision(p)
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
    add_calib(p)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--keep", action="store_true", help="keep every point's checkpoint under <out>/<name>_points/"
    )
    p.add_argument("--no-original", action="store_true", help="do not measure the unquantized model")
    p.add_argument("--no-throughput", action="store_true", help="skip the tokens/s measurement")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument(
        "--peers", nargs="+", default=None, metavar="FILE",
        help="bench_peers.json files (python -m moequant.evals.bench.peers): their ok rows of this model join "
        "the table and the Pareto plot as recorded points (not re-run)",
    )  # fmt: skip
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant.evals.quality import parse_tasks
    from moequant.evals.sweep import SweepConfig, SweepMethod, load_peers, parse_bits, run_sweep
    from moequant.evals.sweep_table import sweep_md
    from moequant.runtime.devices import resolve_device

    resolve_device(args.device)  # --device cuda without CUDA: one line, before any slow pass

    model = local_model(args)  # a Hub id: downloaded here, before any slow pass
    peers = (
        load_peers(args.peers, model) if args.peers else None
    )  # a bad file: one line, before any slow pass
    config = SweepConfig(
        bits=parse_bits(args.bits),
        methods=SweepMethod.parse_list(args.methods),
        tasks=() if args.tasks == "none" else tuple(parse_tasks(args.tasks)),
        limit=args.limit,
        calib=calib_config(args, model),
        group_size=args.group_size,
        batch_size=args.batch_size,
        include_original=not args.no_original,
        keep=args.keep,
        throughput=not args.no_throughput,
        device=args.device,
        progress=not args.quiet,
    )
    out = Path(args.out or f"sweep-{Path(args.model).name if args.model else 'tiny-moe'}")
    result = run_sweep(model, config, out, args.name, command=_command(args), peers=peers)
    print(sweep_md(result["points"], result["peers"]))  # noqa: T201  (the CLI's closing table)
    print(f"\n{out / (args.name + '.md')}, {args.name}.csv, {args.name}.json, {args.name}_pareto.png")  # noqa: T201
    return 0


def _command(args) -> str:
    """The command line for the record; --peers lists its files as given (command_line writes one value)."""
    import argparse
    import shlex

    line = command_line(argparse.Namespace(**(vars(args) | {"peers": None})), "model")
    if not args.peers:
        return line
    return f"{line} --peers {' '.join(shlex.quote(f) for f in args.peers)}"
