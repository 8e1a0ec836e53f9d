"""`moequant push`: upload a finished checkpoint folder (with its model card) to the Hub."""

from __future__ import annotations

import logging

from moequant.cli.common import add_common


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a quantized checkpoint folder (with its model card) to the Hub")
    p.add_argument("folder", help="a complete moequant output folder")
    p.add_argument("repo_id", help="target repository, e.g. me/Mixtral-8x7B-moequant-3b")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant.evals.hub import push

    if not args.debug:  # the HTTP client logs every request at INFO
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    res = push(args.folder, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {res.files} files to {res.repo_url} (revision {res.revision})")  # noqa: T201
    return 0
