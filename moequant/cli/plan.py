"""`moequant plan`: one width per expert under a memory budget, as an editable JSON file; and the options the
plan and quantize commands share."""

from __future__ import annotations

import logging
from pathlib import Path

from moequant.cli.common import (
    MODEL_HELP,
    add_calib,
    add_common,
    add_device,
    add_model_access,
    calibration,
    local_model,
)
from moequant.errors import MoEQuantError
from moequant.runtime.ranks import current

logger = logging.getLogger("moequant")


def add_budget_args(p) -> None:
    """The model and budget options of `plan` and `quantize`."""
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--bits", type=float, default=None, help="average bits per expert weight (default 3.0)")
    p.add_argument("--gb", type=float, default=None, help="total model size budget in GB")
    p.add_argument(
        "--method", default="gptq",
        help="gptq | signround | rtn | bnb-nf4 | bnb-fp4 | bnb-int8 (signround: GPTQ, then sign-gradient rounding "
        "learned so that the layer's routed sum gives the unquantized model's output; each expert keeps the better "
        "of the two; better at 2-3 bits, several times GPTQ's time)",
    )  # fmt: skip
    p.add_argument("--group-size", type=int, default=128)
    _add_grid_args(p)
    _add_planner_args(p)
    add_calib(p)
    add_model_access(p)
    p.add_argument("--batch-size", type=int, default=8)
    add_device(p)
    add_common(p)


def _add_grid_args(p) -> None:
    """How the weights are rounded: symmetric or asymmetric grids, the serving target, GPTQ's column order."""
    grid = p.add_mutually_exclusive_group()
    grid.add_argument(
        "--sym", dest="sym", action="store_const", const=True, default=None,
        help="symmetric grids (default: asymmetric; symmetric with --target vllm or an export --format)",
    )  # fmt: skip
    grid.add_argument("--asym", dest="sym", action="store_const", const=False, help="asymmetric grids")
    p.add_argument(
        "--target", choices=("moequant", "vllm"), default="moequant",
        help="what will run the checkpoint: moequant's runtime (a width per expert; default) or vllm (one width "
        "per MoE layer among symmetric 4 and 8 bits, what vLLM's MoE kernels serve; quantize writes compressed-tensors)",
    )  # fmt: skip
    p.add_argument("--no-act-order", action="store_true", help="GPTQ in column order (default: act-order)")
    p.add_argument("--g-idx", action="store_true", help="act-order with per-column groups (stores g_idx)")


def _add_planner_args(p) -> None:
    """How the planner prices and splits its items: layer probe, damage, importance, group sizes, non-expert."""
    p.add_argument(
        "--no-layer-probe",
        action="store_true",
        help="plan with the uncalibrated proxy (no per-layer loss probe)",
    )
    p.add_argument(
        "--probe",
        choices=("streamed", "measured"),
        default="streamed",
        help="layer probe: streamed (expected KL, one forward and one backward stream, any model size; "
        "default) or measured (loss increase, one whole-model forward per layer, models under 4 GB float32)",
    )
    p.add_argument(
        "--damage",
        choices=("proxy", "gptq"),
        default="proxy",
        help="price items with the RTN / diagonal-moment proxy (default, no forward pass) or with GPTQ's own "
        "loss on the real Hessians (one more pass, GPTQ at every candidate width)",
    )
    p.add_argument(
        "--importance",
        choices=("minimax", "mass"),
        default="minimax",
        help="weight of each expert: its largest routing rate over the calibration sources (default) or its "
        "routing mass on the pooled calibration",
    )
    p.add_argument(
        "--group-sizes",
        default=None,
        help="group sizes the planner may choose per item, e.g. 64,128 (default: --group-size only)",
    )
    p.add_argument(
        "--non-expert",
        default=None,
        help="auto: attention, shared experts and dense MLPs join the knapsack (their bytes count in --bits); or "
        "one spec for all of them and lm_head, e.g. rtn:8 (default: kept in 16-bit)",
    )
    p.add_argument(
        "--whole-experts",
        action="store_true",
        help="one width per expert (default: gate/up and down get their own widths)",
    )


def resolve_grid(args) -> None:
    """Settle --sym and (for quantize) --format from --target and the output format, refusing conflicts:
    --target vllm writes compressed-tensors (or GPTQ), and both are symmetric as vLLM serves them; GPTQ of a
    budget (layers at 4 and 8 bits) is refused up front unless --allow-mixed-gptq (vllm-project/vllm#41955)."""
    fmt = getattr(args, "format", None)
    if args.target == "vllm":
        if fmt == "moequant":
            raise MoEQuantError(
                "--target vllm writes a format vLLM reads (compressed-tensors); drop --format moequant"
            )
        fmt = (fmt or "compressed-tensors") if hasattr(args, "format") else None
    exporting = fmt in ("gptq", "compressed-tensors")
    if exporting and getattr(args, "non_expert", None):
        raise MoEQuantError(
            f"--format {fmt} covers routed experts only; drop --non-expert or keep the moequant format"
        )
    budgeted = getattr(args, "plan", None) is None and not getattr(args, "uniform", False)
    if exporting and budgeted and args.target == "moequant":
        args.target = (
            "vllm"  # the only budgeted plan an export can write: one symmetric 4/8-bit width per layer
        )
    needs_sym = exporting or args.target == "vllm"
    if needs_sym and args.sym is False:
        why = "--target vllm" if args.target == "vllm" else f"--format {fmt}"
        raise MoEQuantError(
            f"{why} writes symmetric grids (vLLM's quantized MoE kernels serve symmetric 4/8-bit only); drop --asym, "
            "or keep the moequant format for asymmetric grids"
        )
    args.sym = True if needs_sym else bool(args.sym)
    if hasattr(args, "format"):
        args.format = fmt or "moequant"
    if args.target == "vllm" and budgeted:
        if args.bits is None and args.gb is None:
            raise MoEQuantError(
                "--target vllm plans 4- and 8-bit layers: give a budget, --bits B (4.2 to 8) or --gb X"
            )
        # --format gptq: whether the plan mixes 4 and 8 bits is known once it is made (a budget that upgrades
        # no layer, or every one, is one width); quantize refuses a mixed one then, before quantizing


def plan_config(args):
    from moequant.config import Method
    from moequant.errors import PlanError
    from moequant.plan.config import Budget, DamageKind, Importance, PlanConfig, ProbeKind, Target

    budget = (
        Budget(gb=args.gb)
        if args.gb is not None
        else Budget(bits=args.bits if args.bits is not None else 3.0)
    )
    config = PlanConfig(
        budget=budget,
        method=Method.parse(args.method),
        group_size=args.group_size,
        sym=bool(args.sym),  # resolve_grid has settled it
        target=Target(args.target),
        **({"widths": Target(args.target).widths} if Target(args.target).widths else {}),
        layer_probe=not args.no_layer_probe,
        probe=ProbeKind(args.probe),
        damage=DamageKind(args.damage),
        importance=Importance(args.importance),
        group_sizes=_group_sizes(args.group_sizes),
        per_projection=not args.whole_experts,
        non_expert_auto=getattr(args, "non_expert", None) == "auto",
        progress=not getattr(args, "quiet", False),
    )
    narrowest = min(config.widths)
    if budget.bits is not None and budget.bits < narrowest:  # refused now, not after the profile pass
        raise PlanError(
            f"impossible budget: {budget.bits} bits per expert weight is below the narrowest width, "
            f"{narrowest} bits (before its scale/zero overhead)"
        )
    return config


def fixed_non_expert(args):
    """The one spec of --non-expert SPEC (None for auto, which the planner handles, or without the option)."""
    from moequant.config import ExpertSpec, parse_spec

    if not args.non_expert or args.non_expert == "auto":
        return None
    spec = parse_spec(args.non_expert, args.group_size, args.sym)
    if isinstance(spec, ExpertSpec):
        raise MoEQuantError(f"--non-expert takes one spec or auto, got {args.non_expert!r}")
    return spec


def _group_sizes(text: str | None) -> tuple[int, ...]:
    from moequant.errors import PlanError

    if not text:
        return ()
    try:
        return tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise PlanError(f"--group-sizes takes integers separated by commas, got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose one width per expert under a memory budget (editable JSON)")
    add_budget_args(p)
    p.add_argument(
        "--profile",
        default=None,
        help="plan from this saved `moequant profile` folder instead of profiling again",
    )
    p.add_argument("--out", default="plan.json")
    p.add_argument("--profile-out", default=None, help="also save the routing profile to this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --profile-out)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant import api
    from moequant.calibration.report import save_profile
    from moequant.checkpoint.writer import check_target

    resolve_grid(args)
    config = plan_config(args)  # a bad budget or width is refused before anything is read
    for out in (args.out, args.profile_out):  # a hand-edited plan.json is not lost to a rerun
        if out is not None:
            check_target(out, args.overwrite)
    prof = api.load_profile(args.profile) if args.profile is not None else None
    model = local_model(args)  # a Hub id: downloaded here, before any slow pass
    tok = api.load_tokenizer(model, args.trust_remote_code)
    data = calibration(args, tok, model)
    trust = args.trust_remote_code
    non_expert = fixed_non_expert(args)
    if prof is not None:
        plan = api.plan(
            model, prof, config, data, act_order=args.g_idx, trust_remote_code=trust, device=args.device
        )
    else:
        plan, prof = api.make_plan_for(
            model, data, config, act_order=args.g_idx, progress=not args.quiet, trust_remote_code=trust,
            device=args.device,
        )  # fmt: skip
    if not current().writes:  # under torchrun every rank plans (the same plan); rank 0 writes it
        return 0
    if non_expert is not None:
        plan.non_expert = non_expert
    out = Path(args.out)
    plan.save(out)
    if args.profile_out:
        save_profile(prof, args.profile_out)
    what = "planned weight (experts and non-expert Linears)" if plan.linears else "expert weight"
    ne = f", non-expert Linears {plan.linear_histogram()}" if plan.linears else ""
    print(f"plan: {plan.average_bits():.3f} bits per {what}, {plan.histogram()}{ne} -> {out}")  # noqa: T201
    return 0
