"""`moequant export-gptq`: a moequant checkpoint as GPTQ v1 (uniform symmetric 4/8-bit layers), for vLLM."""

from __future__ import annotations

from moequant.cli.common import add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-gptq", help="convert a moequant checkpoint to GPTQ v1 (uniform symmetric 4/8-bit layers)"
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant.checkpoint.export_gptq import export_gptq

    path = export_gptq(args.src, args.out, overwrite=args.overwrite)
    print(f"exported GPTQ v1 checkpoint -> {path}")  # noqa: T201
    return 0
