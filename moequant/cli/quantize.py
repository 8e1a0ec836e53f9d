"""`moequant quantize`: profile, plan and quantize a MoE checkpoint expert by expert (or from a saved plan)."""

from __future__ import annotations

from pathlib import Path

from moequant.cli.common import calibration, default_out, local_model
from moequant.cli.plan import add_budget_args, fixed_non_expert, plan_config, resolve_grid
from moequant.errors import MoEQuantError


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a MoE checkpoint expert by expert")
    add_budget_args(p)
    p.add_argument("--plan", default=None, help="an existing plan.json instead of a budget")
    p.add_argument("--uniform", action="store_true", help="every expert at the same width (baseline)")
    p.add_argument("--calib-mode", default="routed", choices=["routed", "all"])
    p.add_argument(
        "--no-weight-by-routing",
        action="store_true",
        help="unweighted Hessians (default: rows weighted by routing)",
    )
    p.add_argument("--min-tokens", type=int, default=32, help="fewer routed tokens -> identity-Hessian RTN")
    p.add_argument(
        "--allow-thin-calibration", action="store_true",
        help="quantize even when over a quarter of the experts would see fewer than --min-tokens routed tokens "
        "and fall back to RTN (default: refused after the profile pass, before the slow ones)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default <model>-moequant-<budget>)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (or a stale .partial)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last finished layer"
    )
    p.add_argument(
        "--gptq-backend", default="auto", choices=["auto", "lapack", "torch"],
        help="GPTQ's sums: lapack (per expert, batch invariant; CPU only) or torch (batched over a chunk of "
        "experts; for accelerators); auto: lapack on CPU, torch elsewhere",
    )  # fmt: skip
    p.add_argument(
        "--gptq-chunk-mb", type=int, default=256,
        help="working memory of one chunk of experts (weights, solver buffers, Hessians), in MB; on CUDA at "
        "most half the free device memory (default 256)",
    )  # fmt: skip
    p.add_argument(
        "--signround-steps", type=int, default=200,
        help="sign-gradient steps per chunk of experts at --method signround (default 200)",
    )  # fmt: skip
    p.add_argument(
        "--offload-activations", action="store_true", default=None,
        help="keep the calibration activations in host memory, moved to the device per batch (default: when "
        "they would take over a quarter of the device's free memory)",
    )  # fmt: skip
    p.add_argument(
        "--format", default=None, choices=["moequant", "gptq", "compressed-tensors"],
        help="moequant (default); compressed-tensors: pack-quantized W4A16/W8A16 groups per layer, for vLLM and "
        "SGLang; gptq: GPTQ v1 with a per-layer `dynamic` map, for vLLM and GPTQModel (both: symmetric grids, one "
        "4- or 8-bit width per MoE layer; --target vllm plans that, writes compressed-tensors unless gptq is "
        "given, and also keeps the moequant format of the same plan at OUT.moequant)",
    )  # fmt: skip
    p.add_argument(
        "--allow-mixed-gptq", action="store_true",
        help="write --format gptq even with MoE layers of different widths, which vLLM's Marlin MoE crashes on "
        "(vllm-project/vllm#41955; default: refused before any slow pass)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from moequant.runtime.ranks import current

    ranks = current()
    with ranks.guard("checking the arguments"):  # under torchrun: every rank checks before any writes
        checked = _checked(args)
    from moequant.checkpoint.writer import partial_dir

    work = checked[5]  # the moequant folder this run writes
    try:
        return _quantize(args, ranks, *checked)
    except KeyboardInterrupt as err:  # the command line names the partial folder and the --resume command
        err.moequant_partial = partial_dir(work)
        raise


def _checked(args):
    """Every argument and input check: nothing after this is refused after a slow pass."""
    from moequant import api
    from moequant.checkpoint.writer import check_target
    from moequant.config import (
        CalibMode,
        GPTQBackend,
        GPTQOptions,
        Method,
        QuantizeConfig,
        QuantSpec,
        SignRoundOptions,
    )
    from moequant.plan.schema import Plan
    from moequant.runtime.devices import resolve_device

    method = Method.parse(args.method)
    resolve_grid(args)  # --target / --format / --sym settled, conflicts refused
    uniform = args.uniform or method.is_bnb
    bits = _check_args(args, method, uniform)  # the uniform width, when uniform
    uniform_spec = QuantSpec(method, bits, args.group_size, args.sym) if bits is not None else None
    config = QuantizeConfig(
        calib_mode=CalibMode(args.calib_mode),
        weight_by_routing=not args.no_weight_by_routing,
        min_tokens=args.min_tokens,
        batch_size=args.batch_size,
        progress=not args.quiet,
        gptq_chunk_mb=args.gptq_chunk_mb,
        device=str(resolve_device(args.device)),
        gptq=GPTQOptions(
            act_order=not args.no_act_order or args.g_idx,
            static_groups=not args.g_idx,
            backend=GPTQBackend(args.gptq_backend),
        ),
        signround=SignRoundOptions(steps=args.signround_steps),
        offload_activations=args.offload_activations,
    )
    if config.gptq.backend is GPTQBackend.LAPACK and config.device != "cpu":
        raise MoEQuantError(f"--gptq-backend lapack runs on CPU only; use torch (or auto) on {config.device}")
    non_expert = fixed_non_expert(args)
    if args.non_expert == "auto" and (uniform or args.plan is not None):
        raise MoEQuantError(
            "--non-expert auto plans the non-expert widths under the budget: drop --uniform / --plan (a saved "
            "plan already holds its Linears' widths)"
        )
    budget = None if uniform or args.plan is not None else plan_config(args)
    out = args.out or default_out(args.model, _label(args, method, uniform))
    export = args.format != "moequant"
    work = f"{out}.moequant" if export else out  # the moequant folder this run writes
    if export:
        check_target(out, args.overwrite)  # the export's folder
    resume = check_target(work, args.overwrite, args.resume)  # False: nothing to resume, a fresh run
    resumed_plan = Path(f"{work}.partial") / "plan.json"
    plan = None
    if resume and resumed_plan.is_file():
        plan = Plan.load(resumed_plan)  # the interrupted run's plan: no second profile pass
    elif args.plan is not None:
        plan = Plan.load(args.plan)
    model = local_model(args)  # a Hub id: downloaded here, before any slow pass
    if uniform_spec is not None and plan is None:
        plan = api.make_uniform_plan(
            model, uniform_spec, act_order=config.stores_g_idx, trust_remote_code=args.trust_remote_code
        )
    if plan is not None and export:
        _check_exportable(plan, args)
    return config, non_expert, budget, out, export, work, resume, plan, model


def _quantize(args, ranks, config, non_expert, budget, out, export, work, resume, plan, model) -> int:
    from moequant import api
    from moequant.runtime import timing

    tok = api.load_tokenizer(model, args.trust_remote_code)
    data = calibration(args, tok, model)

    prof = None
    if plan is None:
        plan, prof = api.make_plan_for(
            model,
            data,
            budget,
            act_order=config.stores_g_idx,
            progress=not args.quiet,
            trust_remote_code=args.trust_remote_code,
            device=config.device,
            check_profile=_thin_check(args, config, budget.method),
        )
        if export:
            _check_exportable(plan, args)
    elif _thin_check(args, config, *_plan_methods(plan)) is not None:
        _check_thin_plan(args, model, plan, data, config)
    if non_expert is not None:
        plan.non_expert = non_expert
    target = out
    if export:
        out = work
    summary = api.quantize(
        model,
        plan,
        data,
        out,
        config,
        tokenizer=tok,
        profile_result=prof,
        overwrite=args.overwrite,
        resume=resume,
        trust_remote_code=args.trust_remote_code,
    )
    if not ranks.writes:  # under torchrun rank 0 reports and exports
        return 0
    summary.seconds, summary.passes = timing.elapsed(), timing.passes()  # the whole command, and each pass
    print(summary.table())  # noqa: T201  (the CLI's closing table)
    if export:
        import shutil

        if args.format == "gptq":
            from moequant.checkpoint.export_gptq import export_gptq as write
        else:
            from moequant.checkpoint.export_ct import export_compressed_tensors as write
        extra = {"allow_mixed": args.allow_mixed_gptq} if args.format == "gptq" else {}
        path = write(out, target, overwrite=args.overwrite, **extra)
        if args.target == "vllm":
            print(f"moequant format of the same plan -> {out}")  # noqa: T201
        else:
            shutil.rmtree(out)
        print(f"exported {args.format} checkpoint -> {path}")  # noqa: T201
    return 0


def _check_args(args, method, uniform: bool) -> int | None:
    """Refuse flag combinations that cannot work, before anything is read; the uniform width, if uniform."""
    from moequant.config import Method

    given = [x for x in ("bits", "gb", "plan") if getattr(args, x) is not None]
    if len(given) > 1:
        raise MoEQuantError(f"give one of --bits, --gb, --plan (got {', '.join('--' + g for g in given)})")
    if args.plan is not None:
        return None
    if not uniform:
        if method is Method.KEEP:
            raise MoEQuantError(f"--method {method.value} has one width; use it with --uniform")
        return None
    if args.gb is not None:
        raise MoEQuantError("--uniform takes --bits (one integer width), not --gb")
    bits = args.bits if args.bits is not None else (method.fixed_bits or 3)
    if not method.is_bnb and float(bits) != int(bits):
        raise MoEQuantError(f"--uniform needs an integer width (2, 3, 4 or 8), got --bits {bits}")
    return int(bits)


def _thin_check(args, config, *methods):
    """The refusal of too thin a calibration for a routing profile (calibration/thin.py), or None where it
    does not apply: --allow-thin-calibration, --calib-mode all (every expert sees every token), --min-tokens 0
    or no method that builds Hessians."""
    from moequant.calibration.thin import from_profile, refuse_if_thin
    from moequant.config import CalibMode
    from moequant.quantize.methods import needs_hessian

    if args.allow_thin_calibration or config.calib_mode is CalibMode.ALL or config.min_tokens <= 0:
        return None
    if not any(needs_hessian(m) for m in methods):
        return None
    return lambda prof: refuse_if_thin(from_profile(prof, config.min_tokens))


def _plan_methods(plan) -> set:
    from moequant.config import proj_specs

    return {p.method for specs in plan.layers.values() for s in specs for p in proj_specs(s)}


def _check_thin_plan(args, model, plan, data, config) -> None:
    """A given plan or uniform width: no profile pass, so the calibration is judged by its distinct tokens
    against the experts that quantize with a Hessian, each expecting its even share of the routing."""
    from moequant import api
    from moequant.calibration.thin import estimate, refuse_if_thin
    from moequant.config import proj_specs
    from moequant.quantize.methods import needs_hessian

    source = api.open_source(model, trust_remote_code=args.trust_remote_code, lazy_experts=True, device="cpu")
    top_k = source.arch.top_k or 1
    layer_experts = {i: len(specs) for i, specs in plan.layers.items()}
    hessian = {
        i: sum(any(needs_hessian(p.method) for p in proj_specs(s)) for s in specs)
        for i, specs in plan.layers.items()
    }
    refuse_if_thin(estimate(data, top_k, layer_experts, hessian, config.min_tokens))


def _check_exportable(plan, args) -> None:
    """--format gptq / compressed-tensors: refuse a plan the export cannot write, before hours of quantizing
    (GPTQ with layers of different widths too, unless --allow-mixed-gptq)."""
    from moequant.checkpoint.export_gptq import check_exportable, refuse_mixed_widths

    _, _, layer_bits = check_exportable(plan.model_type, plan.layers)
    if args.format == "gptq" and not args.allow_mixed_gptq:
        refuse_mixed_widths(layer_bits)


def _label(args, method, uniform: bool) -> str:
    """The budget part of the default output folder name."""
    if args.plan is not None:
        return Path(args.plan).stem
    if uniform:
        bits = int(args.bits) if args.bits is not None else (method.fixed_bits or 3)
        return f"uniform-{method.value}-{bits}b"
    return f"{args.bits or 3.0}b" if args.gb is None else f"{args.gb}gb"
