"""Command-line entry point: `moequant {profile,plan,quantize,eval,sweep,push}`.

Every command turns a MoEQuantError (bad input, missing file, impossible budget...) into one clear line on
stderr and exit status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from moequant.errors import MoEQuantError

logger = logging.getLogger("moequant")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors, no progress bars")


def _add_calib(p: argparse.ArgumentParser, samples: int = 128, seq_len: int = 256) -> None:
    p.add_argument(
        "--calib", default=None, help="calibration data: bundled corpus (default), .txt/.jsonl, or HF dataset"
    )
    p.add_argument("--samples", type=int, default=samples, help=f"calibration sequences (default {samples})")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the repository")


def cmd_profile(args) -> int:
    from moequant import api
    from moequant.calibration.report import save_profile
    from moequant.checkpoint.loading import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(args.model, args.trust_remote_code)
    data = _calibration(args, tok)
    prof = api.profile(
        args.model, data, batch_size=args.batch_size, min_tokens=args.min_tokens, progress=not args.quiet
    )
    path = save_profile(prof, args.out)
    cov = prof.coverage()
    n_under = sum(len(v) for v in cov.values())
    logger.info("profiled %d tokens in %.1f s -> %s", prof.tokens, time.perf_counter() - t0, path)
    for i, s in sorted(prof.layers.items()):
        logger.info(
            "layer %2d: cv %.3f  entropy %.3f  under-covered experts %s",
            i,
            s.cv(),
            s.entropy(),
            cov[i] or "none",
        )
    if n_under:
        logger.warning(
            "%d experts saw fewer than %d tokens (listed in profile.json `coverage`)",
            n_under,
            args.min_tokens,
        )
    return 0


def _budget_and_plan_config(args):
    from moequant.config import Method
    from moequant.plan.schema import Budget, PlanConfig

    budget = (
        Budget(gb=args.gb)
        if args.gb is not None
        else Budget(bits=args.bits if args.bits is not None else 3.0)
    )
    return PlanConfig(
        budget=budget,
        method=Method.parse(args.method),
        group_size=args.group_size,
        sym=args.sym,
        layer_probe=not args.no_layer_probe,
    )


def _calibration(args, tokenizer):
    from moequant.calibration.data import CalibConfig, build_calibration

    return build_calibration(
        tokenizer, CalibConfig(spec=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    )


def _default_out(model: str | None, label: str) -> str:
    name = Path(model).name if model else "tiny-moe"
    return f"{name}-moequant-{label}"


def cmd_plan(args) -> int:
    from moequant import api
    from moequant.checkpoint.loading import load_tokenizer

    tok = load_tokenizer(args.model, args.trust_remote_code)
    data = _calibration(args, tok)
    plan, prof = api.make_plan_for(
        args.model,
        data,
        _budget_and_plan_config(args),
        act_order=args.g_idx,
        progress=not args.quiet,
    )
    out = Path(args.out)
    plan.save(out)
    if args.profile_out:
        from moequant.calibration.report import save_profile

        save_profile(prof, args.profile_out)
    print(f"plan: {plan.average_bits():.3f} bits per expert weight, {plan.histogram()} -> {out}")  # noqa: T201
    return 0


def cmd_quantize(args) -> int:
    from moequant import api
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.config import CalibMode, Method, QuantizeConfig, QuantSpec
    from moequant.plan.schema import Plan

    method = Method.parse(args.method)
    given = [x for x in ("bits", "gb", "plan") if getattr(args, x) is not None]
    if len(given) > 1:
        raise MoEQuantError(f"give one of --bits, --gb, --plan (got {', '.join('--' + g for g in given)})")
    uniform = args.uniform or method.is_bnb
    tok = load_tokenizer(args.model, args.trust_remote_code)
    data = _calibration(args, tok)
    config = QuantizeConfig(
        calib_mode=CalibMode(args.calib_mode),
        weight_by_routing=not args.no_weight_by_routing,
        min_tokens=args.min_tokens,
        act_order=not args.no_act_order or args.g_idx,
        static_groups=not args.g_idx,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    prof = None
    label = _label(args, method, uniform)
    out = args.out or _default_out(args.model, label)
    work = f"{out}.moequant" if args.format == "gptq" else out  # the moequant folder this run writes
    resumed_plan = Path(f"{work}.partial") / "plan.json"
    if args.resume and resumed_plan.is_file():
        plan = Plan.load(resumed_plan)  # the interrupted run's plan: no second profile pass
    elif args.plan is not None:
        plan = Plan.load(args.plan)
    elif uniform:
        if args.gb is not None:
            raise MoEQuantError("--uniform takes --bits (one integer width), not --gb")
        bits = args.bits if args.bits is not None else (method.fixed_bits or 3)
        if not method.is_bnb and float(bits) != int(bits):
            raise MoEQuantError(f"--uniform needs an integer width (2, 3, 4 or 8), got --bits {bits}")
        spec = QuantSpec(method, int(bits), args.group_size, args.sym)
        plan = api.make_uniform_plan(args.model, spec, act_order=config.stores_g_idx)
    else:
        if method.is_bnb or method is Method.KEEP:
            raise MoEQuantError(f"--method {method.value} has one width; use it with --uniform")
        plan, prof = api.make_plan_for(
            args.model,
            data,
            _budget_and_plan_config(args),
            act_order=config.stores_g_idx,
            progress=not args.quiet,
        )
    if args.non_expert:
        from moequant.plan.schema import parse_spec

        plan.non_expert = parse_spec(args.non_expert, args.group_size, args.sym)
    if args.format == "gptq":
        from moequant.checkpoint.export_gptq import check_exportable

        check_exportable(plan.model_type, plan.layers)  # refuse before hours of work, not after
        target, out = out, work
    summary = api.quantize(
        args.model,
        plan,
        data,
        out,
        config,
        tokenizer=tok,
        profile_result=prof,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    print(summary.table())  # noqa: T201  (the CLI's closing table)
    if args.format == "gptq":
        import shutil

        from moequant.checkpoint.export_gptq import export_gptq

        path = export_gptq(out, target, overwrite=args.overwrite)
        shutil.rmtree(out)
        print(f"exported GPTQ v1 checkpoint -> {path}")  # noqa: T201
    return 0


def _label(args, method, uniform: bool) -> str:
    """The budget part of the default output folder name."""
    if args.plan is not None:
        return Path(args.plan).stem
    if uniform:
        bits = int(args.bits) if args.bits is not None else (method.fixed_bits or 3)
        return f"uniform-{method.value}-{bits}b"
    return f"{args.bits or 3.0}b" if args.gb is None else f"{args.gb}gb"


def cmd_export_gptq(args) -> int:
    from moequant.checkpoint.export_gptq import export_gptq

    path = export_gptq(args.src, args.out, overwrite=args.overwrite)
    print(f"exported GPTQ v1 checkpoint -> {path}")  # noqa: T201
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moequant", description=__doc__.splitlines()[0])
    from moequant import __version__

    parser.add_argument("--version", action="version", version=f"moequant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="record per-expert routing statistics on calibration text")
    p.add_argument(
        "model", nargs="?", default=None, help="model folder or Hub id (default: bundled tiny MoE)"
    )
    _add_calib(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=32, help="coverage threshold per expert")
    p.add_argument("--out", default="profile", help="output folder (default ./profile)")
    _add_common(p)
    p.set_defaults(func=cmd_profile)

    def add_quant_args(p):
        p.add_argument("model", nargs="?", default=None, help="model folder (default: bundled tiny MoE)")
        p.add_argument(
            "--bits", type=float, default=None, help="average bits per expert weight (default 3.0)"
        )
        p.add_argument("--gb", type=float, default=None, help="total model size budget in GB")
        p.add_argument("--method", default="gptq", help="gptq | rtn | bnb-nf4 | bnb-fp4 | bnb-int8")
        p.add_argument("--group-size", type=int, default=128)
        p.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
        p.add_argument(
            "--no-act-order", action="store_true", help="GPTQ in column order (default: act-order)"
        )
        p.add_argument("--g-idx", action="store_true", help="act-order with per-column groups (stores g_idx)")
        p.add_argument(
            "--no-layer-probe",
            action="store_true",
            help="plan with the uncalibrated proxy (no per-layer loss probe)",
        )
        _add_calib(p)
        p.add_argument("--batch-size", type=int, default=8)
        _add_common(p)

    p = sub.add_parser("plan", help="choose one width per expert under a memory budget (editable JSON)")
    add_quant_args(p)
    p.add_argument("--out", default="plan.json")
    p.add_argument("--profile-out", default=None, help="also save the routing profile to this folder")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quantize", help="quantize a MoE checkpoint expert by expert")
    add_quant_args(p)
    p.add_argument("--plan", default=None, help="an existing plan.json instead of a budget")
    p.add_argument(
        "--non-expert",
        default=None,
        help="also quantize attention / shared experts / lm_head at one spec, e.g. rtn:8",
    )
    p.add_argument("--uniform", action="store_true", help="every expert at the same width (baseline)")
    p.add_argument("--calib-mode", default="routed", choices=["routed", "all"])
    p.add_argument(
        "--no-weight-by-routing",
        action="store_true",
        help="unweighted Hessians (default: rows weighted by routing)",
    )
    p.add_argument("--min-tokens", type=int, default=32, help="fewer routed tokens -> identity-Hessian RTN")
    p.add_argument("--out", default=None, help="output folder (default <model>-moequant-<budget>)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (or a stale .partial)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last finished layer"
    )
    p.add_argument(
        "--format", default="moequant", choices=["moequant", "gptq"], help="gptq: GPTQ v1 export for vLLM"
    )
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "export-gptq", help="convert a moequant checkpoint to GPTQ v1 (uniform symmetric 4/8-bit layers)"
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_export_gptq)

    from moequant.cli.evals import add_subcommands  # eval, sweep, push

    add_subcommands(sub, _add_common)
    return parser


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
    logging.getLogger("moequant").setLevel(level)
    for noisy in ("transformers", "accelerate", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug, args.quiet)
    try:
        return int(args.func(args) or 0)
    except MoEQuantError as err:
        if args.debug:
            raise
        print(f"moequant {args.command}: error: {err}", file=sys.stderr)  # noqa: T201  (the CLI's own output)
        return 2
    except KeyboardInterrupt:
        print(f"moequant {args.command}: interrupted", file=sys.stderr)  # noqa: T201
        return 130


if __name__ == "__main__":
    sys.exit(main())
