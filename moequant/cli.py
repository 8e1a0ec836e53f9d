"""Command-line entry point: `moequant {profile,plan,quantize,eval,sweep,push}`.

Every command turns a MoEQuantError (bad input, missing file, impossible budget...) into one clear line on
stderr and exit status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

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
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.calibration.profiler import ProfileConfig, profile_model
    from moequant.calibration.report import save_profile
    from moequant.loading import load_model, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(args.model, args.trust_remote_code)
    data = build_calibration(
        tok, CalibConfig(spec=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    )
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    prof = profile_model(
        model,
        data,
        ProfileConfig(batch_size=args.batch_size, min_tokens=args.min_tokens, progress=not args.quiet),
        model_id=args.model or "bundled",
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
