"""Options and helpers every command shares."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors, no progress bars")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default=None,
        help="where the layers compute: cuda, cuda:N or cpu (default: cuda when available, else cpu; under "
        "torchrun on CUDA each rank takes cuda:LOCAL_RANK)",
    )  # fmt: skip


def add_calib(
    p: argparse.ArgumentParser,
    samples: int | None = None,
    seq_len: int | None = None,
    what: str = "calibration data",
    samples_help: str = "calibration sequences",
) -> None:
    """--calib, --samples, --seq-len, --seed: the calibration windows (calibration/data.py CalibConfig).
    `samples` / `seq_len` None: resolved from the model (calibration/sizing.py), see SIZE_HELP."""
    p.add_argument(
        "--calib", default=None, help=f"{what}: bundled corpus (default), .txt/.jsonl, or HF dataset"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=samples,
        help=f"{samples_help} (default {samples if samples is not None else SIZE_HELP})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=seq_len,
        help=f"tokens per sequence (default {seq_len if seq_len is not None else SIZE_HELP})",
    )
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


SIZE_HELP = (
    "128 x 2048 tokens, GPTQ's usual size, so each expert sees more tokens than its input width; seq-len "
    "capped at the model's max_position_embeddings; the bundled tiny model: 128 x 256"
)

MODEL_HELP = "model folder or Hugging Face Hub id, e.g. Qwen/Qwen3-30B-A3B (default: bundled tiny MoE)"


def add_revision(p: argparse.ArgumentParser, what: str = "MODEL") -> None:
    p.add_argument(
        "--revision", default="main", help=f"branch, tag or commit when {what} is a Hub id (default main)"
    )


def add_model_access(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the repository (and download its *.py files)",
    )
    add_revision(p)


def local_model(args, attr: str = "model") -> str | None:
    """The model argument as a local folder, before any slow pass: a Hub id is downloaded (config, tokenizer,
    safetensors) into the Hub cache and replaced by its snapshot path; None, the bundled aliases and local
    folders pass unchanged. Errors (unknown id or revision, gated, offline) are one HubError line."""
    from moequant.checkpoint.hub_source import local_model as resolve
    from moequant.checkpoint.loading import check_model_code

    trust = getattr(args, "trust_remote_code", False)
    path = resolve(
        getattr(args, attr),
        revision=getattr(args, "revision", None),
        trust_remote_code=trust,
        progress=not getattr(args, "quiet", False),
    )
    check_model_code(path, trust)  # a model that needs its own code: refused here without the flag
    return path


def calib_config(args, model):
    """The calibration config of the command line; --samples / --seq-len not given: `model`'s defaults
    (calibration/sizing.py: 128 x 2048, the bundled model 128 x 256)."""
    from moequant.calibration.data import CalibConfig
    from moequant.calibration.sizing import resolve_size

    samples, seq_len = resolve_size(model, args.samples, args.seq_len)
    return CalibConfig(spec=args.calib, samples=samples, seq_len=seq_len, seed=args.seed)


def calibration(args, tokenizer, model):
    from moequant.calibration.data import build_calibration
    from moequant.runtime.ranks import current

    return build_calibration(tokenizer, calib_config(args, model), current())  # tokenized across the ranks


def default_out(model: str | None, label: str) -> str:
    name = Path(model).name if model else "tiny-moe"  # a Hub id org/name gives its name
    return f"{name}-moequant-{label}"


def command_line(args, positional: str) -> str:
    """The command as given (options that differ from their defaults), for the reports' records."""
    defaults = vars(args.subparser.parse_args(["_"]))
    words = ["moequant", args.command] + (
        [str(getattr(args, positional))] if getattr(args, positional) else []
    )
    for key, value in vars(args).items():
        if key in ("func", "command", "subparser", "debug", "quiet", positional) or value == defaults.get(
            key
        ):
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)
