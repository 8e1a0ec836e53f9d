"""`moequant profile`: per-expert routing statistics on calibration text, saved for `moequant plan --profile`."""

from __future__ import annotations

import logging
import time

from moequant.cli.common import (
    MODEL_HELP,
    add_calib,
    add_common,
    add_device,
    add_model_access,
    calibration,
    local_model,
)
from moequant.runtime.ranks import current

logger = logging.getLogger("moequant")


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="record per-expert routing statistics on calibration text")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_calib(p)
    add_model_access(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=32, help="coverage threshold per expert")
    p.add_argument("--out", default="profile", help="output folder (default ./profile)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_device(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant import api
    from moequant.calibration.report import save_profile
    from moequant.checkpoint.writer import check_target

    check_target(args.out, args.overwrite)  # before any slow pass
    t0 = time.perf_counter()
    model = local_model(args)  # a Hub id: downloaded here, before any slow pass
    tok = api.load_tokenizer(model, args.trust_remote_code)
    data = calibration(args, tok, model)
    config = api.ProfileConfig(
        batch_size=args.batch_size, min_tokens=args.min_tokens, progress=not args.quiet
    )
    prof = api.profile(model, data, config, trust_remote_code=args.trust_remote_code, device=args.device)
    if not current().writes:  # under torchrun rank 0 writes the profile
        return 0
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
