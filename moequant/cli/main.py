"""Command-line entry point: `moequant {profile,plan,quantize,export-gptq,export-compressed-tensors,eval,sweep,push,families}`.

Every command turns a MoEQuantError (bad input, missing file, impossible budget...) into one clear line on
stderr and exit status 2; --debug shows the traceback instead. Each command lives in its own module here.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from moequant.cli import evaluate, export, families, plan, profile, push, quantize, sweep
from moequant.errors import MoEQuantError

COMMANDS = (profile, plan, quantize, export, evaluate, sweep, push, families)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own refusals (a value of the wrong type, a missing or unknown argument, a bad choice) in one
    line on stderr with exit status 2, like the commands' own, instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from moequant import __version__

    parser = OneLineParser(prog="moequant", description=__doc__.splitlines()[0])  # subparsers share the class
    parser.add_argument("--version", action="version", version=f"moequant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for p in sub.choices.values():
        p.set_defaults(subparser=p)  # commands that record their command line read its defaults
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


DISTRIBUTED = ("profile", "plan", "quantize")  # the commands that run under torchrun


def main(argv: list[str] | None = None) -> int:
    from moequant.runtime import ranks as ranks_mod
    from moequant.runtime import timing

    timing.reset(from_process_start=argv is None)  # `moequant ...`: the closing time counts from the start
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ranks = _join_launch(args)
    except MoEQuantError as err:
        _setup_logging(args.debug, args.quiet)
        print(f"moequant {args.command}: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    if not ranks.writes:
        args.quiet = True  # progress bars and INFO logs from rank 0 only
    _setup_logging(args.debug, args.quiet)
    if not ranks.writes:  # rank 0 logs; the others say only what stops them
        logging.getLogger("moequant").setLevel(logging.ERROR)
    where = f" (rank {ranks.rank} of {ranks.world})" if ranks.distributed else ""
    try:
        return int(args.func(args) or 0)
    except MoEQuantError as err:
        if args.debug:
            raise
        if getattr(err, "moequant_rank_reported", False) and not ranks.writes:
            return 2  # every rank knows this failure: rank 0 says it
        print(f"moequant {args.command}{where}: error: {err}", file=sys.stderr)  # noqa: T201  (the CLI's own output)
        return 2
    except KeyboardInterrupt as err:
        print(f"moequant {args.command}{where}: interrupted{interrupted_hint(err, argv)}", file=sys.stderr)  # noqa: T201
        return 130
    finally:
        ranks_mod.shutdown()


def interrupted_hint(err: KeyboardInterrupt, argv: list[str]) -> str:
    """How to continue an interrupted quantize run: the partial folder it left (`err.moequant_partial`, set by
    the command) and the command line that resumes it; '' when there is nothing to resume."""
    partial = getattr(err, "moequant_partial", None)
    if partial is None or not Path(partial).is_dir():
        return ""
    again = ["moequant", *argv, *([] if "--resume" in argv else ["--resume"])]
    return f"; the finished layers are kept in {partial}; continue with: {shlex.join(again)}"


def _join_launch(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group of the command's device (gloo on CPU, NCCL on
    CUDA, each CUDA rank on cuda:LOCAL_RANK); commands that do not split their work refuse a launch."""
    from moequant.runtime import ranks

    if not ranks.launched():
        return ranks.current()
    if args.command not in DISTRIBUTED:
        raise MoEQuantError(f"{args.command} does not run under torchrun; run it as one process")
    import torch

    from moequant.runtime.devices import resolve_device

    device = ranks.rank_device(resolve_device(getattr(args, "device", None)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        args.device = str(device)
    return ranks.init_from_env(device)


if __name__ == "__main__":
    sys.exit(main())
