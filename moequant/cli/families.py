"""`moequant families`: the MoE families of this transformers install and how moequant handles each."""

from __future__ import annotations

from moequant.cli.common import add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "families",
        help="list the MoE families of the installed transformers and the adapter derived for each",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also run each through profile, quantize (8-bit RTN, 4-bit GPTQ) and reload on a tiny random "
        "model, and print the families table of docs/families.md (10-20 minutes on 2 cores)",
    )
    p.add_argument("model_types", nargs="*", help="only these model types (default: every MoE family)")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant.arch.families import describe, moe_model_types

    types = args.model_types or moe_model_types()
    if args.check:
        from moequant.evals.families import check_all, markdown

        print(markdown(check_all(types, progress=not args.quiet)))  # noqa: T201  (the command's output)
        return 0
    rows = [describe(t) for t in types]
    width = max(len(r.model_type) for r in rows)
    for r in rows:
        if r.status in ("derived", "hand-written"):
            line = (
                f"{r.model_type:{width}}  {r.status:12}  {r.paths}; {r.layout}, {r.activation}; {r.routing}"
            )
        else:
            line = f"{r.model_type:{width}}  {r.status:12}  {r.reason}"
        print(line)  # noqa: T201
    ok = sum(r.status in ("derived", "hand-written") for r in rows)
    print(f"{ok} of {len(rows)} families have an adapter (moequant families --check runs each end to end)")  # noqa: T201
    return 0
