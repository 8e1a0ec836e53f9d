"""Every MoE family of the installed transformers through the whole pipeline, on a tiny random model each.

For each model type arch/families.py lists: build a tiny random model with the family's own classes
(arch/tiny.py), save it in bfloat16 with `save_pretrained` (so the checkpoint is in the family's published
key layout), profile it, quantize it from the folder (streamed, through transformers' conversion mapping)
at 8-bit RTN, 4-bit GPTQ and 4-bit RTN, reload each with `from_pretrained`, and compare the logits with the
16-bit model's: relative error ||l_q - l|| / ||l||. Each 8-bit folder is also loaded in bfloat16 and float16, with
the adapter cache emptied first (as in a fresh process, where the adapter is derived while from_pretrained has
set the checkpoint's dtype as the default), and its logits compared with its float32 load: the relative error in
each dtype (the dtype column) must stay within twice what the same dtype costs the 16-bit model (its own bf16 /
fp16 load against its float32 load), plus DTYPE_FLOOR; "-" marks a dtype in which transformers' own 16-bit model
does not run (deepseek_v4 in float16). 8-bit must stay within 2% on fresh token ids; 4-bit
GPTQ within the usual GPTQ error, taken as: no more than RTN's at the same width, on calibration sequences
(4 of the 16): GPTQ minimises each layer's output error on its calibration inputs, so it beats RTN there
exactly when its Hessians were collected from the right inputs; a random model on random tokens has nothing
GPTQ could carry over to other text (on held-out random ids GPTQ-4 loses to RTN-4 in most families,
evals/results/figures_from_code_comments.md; on the trained bundled model GPTQ wins,
evals/results/quality_bundled.md).

`moequant families --check` prints the resulting table (docs/families.md's table is this output).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_REL_ERR_8BIT = 0.02  # the bound for 8-bit
LOAD_DTYPES = (torch.bfloat16, torch.float16)  # loaded beside float32
DTYPE_FLOOR = {torch.bfloat16: 0.005, torch.float16: 0.001}  # added to 2x the 16-bit model's own dtype error
GPTQ_VS_RTN = (
    1.0  # 4-bit: GPTQ's logits error at most RTN's at the same width and group size (the usual GPTQ error)
)


@dataclass
class FamilyCheck:
    model_type: str
    status: str  # "ok" | "fails" | "unsupported" | "error"
    how: str = ""  # the derived adapter, in a few words
    err8: float | None = None
    err4: float | None = None  # 4-bit GPTQ
    rtn4: float | None = None  # 4-bit RTN, the bar GPTQ must clear
    dtype_err: dict[str, float] | None = None  # 8-bit folder loaded in bf16 / fp16 vs its float32 load
    dtype_err16: dict[str, float] | None = None  # the same for the 16-bit model: what the dtype itself costs
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _routed_sets(folder: Path, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer, the sorted expert indices every token of `ids` is routed to ([tokens, k])."""
    from moequant.arch import block_of, decoder_layers, get_arch
    from moequant.checkpoint.loading import load_model

    model = load_model(str(folder), dtype=torch.float32)
    arch = get_arch(model)
    got, handles = {}, []
    for i, layer in enumerate(decoder_layers(model, arch)):
        experts = getattr(block_of(layer, arch), arch.experts, None)
        if experts is not None:

            def hook(_m, args, kwargs, i=i):
                top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                got[i] = top_k_index.sort(-1).values

            handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def _rerouted_tokens(src: Path, out: Path, ids: torch.Tensor) -> int:
    """Tokens that the quantized model routes to a different set of experts in at least one MoE layer."""
    a, b = _routed_sets(src, ids), _routed_sets(out, ids)
    changed = torch.zeros(ids.numel(), dtype=torch.bool)
    for i in a.keys() & b.keys():
        changed |= (a[i] != b[i]).any(-1)
    return int(changed.sum())


def _logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from moequant.checkpoint.loading import load_model

    model = load_model(str(folder), dtype=dtype)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _dtype_errors(
    folder: Path, ids: torch.Tensor, ref: torch.Tensor, dtypes=LOAD_DTYPES, tolerate: bool = False
) -> dict[str, float | None]:
    """Relative logits error of `folder` loaded in each of `dtypes` against its float32 logits `ref`, each load
    deriving the adapter afresh (see module docstring). `tolerate`: a dtype in which the model does not run
    (transformers' own deepseek_v4 keeps a float32 Linear that fails in float16) is None instead of raising."""
    from moequant.arch.lookup import forget_adapters

    errs = {}
    for dtype in dtypes:
        forget_adapters()
        try:
            errs[_name(dtype)] = _rel(_logits(folder, ids, dtype), ref)
        except RuntimeError as err:
            if not tolerate:
                raise
            logger.info("%s does not run in %s: %s", folder, dtype, err)
            errs[_name(dtype)] = None
    return errs


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class _FamilyRun:
    """What one family's pipeline measured: logits errors of each quantized folder and of each load dtype."""

    fresh_ids: torch.Tensor  # [4, 32] token ids no quantization saw (the 8-bit bound)
    err8: float  # 8-bit RTN on fresh_ids
    err4: float  # 4-bit GPTQ on calibration sequences
    rtn4: float  # 4-bit RTN on calibration sequences
    runs_in: list[torch.dtype]  # the LOAD_DTYPES in which the 16-bit model runs
    dtype_err: dict[str, float | None]  # 8-bit folder in each of runs_in vs its float32 load
    dtype_err16: dict[str, float | None]  # the 16-bit model in each of LOAD_DTYPES vs its float32 load


def check_family(model_type: str, workdir: Path) -> FamilyCheck:
    """Run the pipeline on a tiny `model_type` under `workdir` (see module docstring)."""
    from moequant.arch.families import describe

    t0 = time.perf_counter()
    info = describe(model_type)
    if info.status in ("unsupported", "error"):
        return FamilyCheck(model_type, info.status, reason=info.reason, seconds=time.perf_counter() - t0)
    how = f"{info.layout}, {info.activation}, {info.routing}"
    src = workdir / model_type / "bf16"
    try:
        run = _run_family(model_type, src, workdir / model_type)
    except Exception as err:  # noqa: BLE001 - a family failing is a row of the table, with its reason
        msg = f"{type(err).__name__}: {err}".replace(str(workdir), "<dir>").splitlines()[0][:200]
        return FamilyCheck(model_type, "error", how, reason=msg, seconds=time.perf_counter() - t0)
    why = _failure(run)
    ok = not why
    # say whether routing flips explain an 8-bit failure (a near tie moved by the 8-bit error)
    if run.err8 > MAX_REL_ERR_8BIT:
        n = _rerouted_tokens(src, workdir / model_type / "rtn8", run.fresh_ids)
        why += f" ({n} of {run.fresh_ids.numel()} tokens routed to other experts)"
    return FamilyCheck(
        model_type,
        "ok" if ok else "fails",
        how,
        run.err8,
        run.err4,
        run.rtn4,
        run.dtype_err,
        run.dtype_err16,
        why,
        time.perf_counter() - t0,
    )


def _run_family(model_type: str, src: Path, folder: Path) -> _FamilyRun:
    """Save the tiny model at `src`, profile it, quantize it three ways under `folder` and measure each."""
    from moequant.arch.tiny import save_tiny
    from moequant.config import Method

    save_tiny(model_type, src, seed=0, dtype=torch.bfloat16)
    data, fresh_ids = _random_data()
    calib_ids = data.input_ids[:4]  # GPTQ's objective: the 4-bit comparison (see module docstring)
    _profile(src, data)
    ref = {"calib": _logits(src, calib_ids), "fresh": _logits(src, fresh_ids)}
    dtype_err16 = _dtype_errors(src, fresh_ids, ref["fresh"], tolerate=True)  # what the dtype costs the model
    runs_in = [d for d in LOAD_DTYPES if dtype_err16[_name(d)] is not None]
    errs, dtype_err = {}, {}
    for bits, method in ((8, Method.RTN), (4, Method.GPTQ), (4, Method.RTN)):
        out = _quantize(src, folder / f"{method.value}{bits}", data, bits, method)
        which = "fresh" if bits == 8 else "calib"
        logits = _logits(out, fresh_ids if bits == 8 else calib_ids)
        errs[(bits, method)] = _rel(logits, ref[which])
        if bits == 8:
            dtype_err = _dtype_errors(out, fresh_ids, logits, runs_in)
    e8, e4, r4 = errs[(8, Method.RTN)], errs[(4, Method.GPTQ)], errs[(4, Method.RTN)]
    return _FamilyRun(fresh_ids, e8, e4, r4, runs_in, dtype_err, dtype_err16)


def _random_data():
    """16 calibration sequences of 32 random token ids, and 4 fresh sequences of 32 (one seeded generator)."""
    from moequant.calibration.data import CalibData

    g = torch.Generator().manual_seed(0)
    data = CalibData(torch.randint(0, 256, (16, 32), generator=g), ["random"] * 16, "random token ids")
    fresh_ids = torch.randint(0, 256, (4, 32), generator=g)  # the 8-bit bound: text it never saw
    return data, fresh_ids


def _profile(src: Path, data) -> None:
    """Profile the folder; raises when the profile found no MoE layer."""
    from moequant.calibration.profiler import ProfileConfig, profile_pass
    from moequant.checkpoint.source import open_source
    from moequant.errors import MoEQuantError

    prof = profile_pass(
        open_source(str(src), lazy_experts=True), data, ProfileConfig(batch_size=4, progress=False)
    )
    if not prof.layers:
        raise MoEQuantError("the profile recorded no MoE layer")


def _quantize(src: Path, out: Path, data, bits: int, method) -> Path:
    """Quantize every expert of `src` at one width and method (group size 32) into `out`."""
    from moequant.config import QuantizeConfig, QuantSpec
    from moequant.plan.planner import make_uniform_plan
    from moequant.quantize.run import quantize

    plan = make_uniform_plan(str(src), QuantSpec(method, bits, 32))
    quantize(str(src), plan, data, out, QuantizeConfig(progress=False, batch_size=4, min_tokens=1))
    return out


def _failure(run: _FamilyRun) -> str:
    """Why the family fails its bounds (the first bound it misses), or "" when it passes them all."""
    bad_dtypes = [
        _name(d)
        for d in run.runs_in
        if not run.dtype_err[_name(d)] <= 2 * run.dtype_err16[_name(d)] + DTYPE_FLOOR[d]
    ]
    if run.err8 > MAX_REL_ERR_8BIT:
        return "8-bit logits error above 2%"
    if run.err4 > GPTQ_VS_RTN * run.rtn4:
        return "4-bit GPTQ worse than RTN"
    if bad_dtypes:
        d = bad_dtypes[0]
        return f"8-bit loaded in {d} is {run.dtype_err[d]:.4f} off its float32 load, the 16-bit model {run.dtype_err16[d]:.4f}"
    return ""


def check_all(model_types: list[str] | None = None, workdir: Path | None = None, progress: bool = True):
    """check_family for every MoE family of this transformers (or `model_types`)."""
    from tqdm import tqdm

    from moequant.arch.families import moe_model_types

    types = model_types or moe_model_types()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        return [check_family(t, root) for t in tqdm(types, desc="families", disable=not progress)]


def markdown(checks: list[FamilyCheck]) -> str:
    """The families table of docs/families.md."""
    import transformers

    lines = [
        f"transformers {transformers.__version__}: {sum(c.ok for c in checks)} of {len(checks)} MoE families "
        "quantize and reload (tiny random model each, `moequant families --check`).",
        "",
        "| family | result | adapter (derived) | 8-bit RTN | 4-bit GPTQ | 4-bit RTN | 8-bit loaded in bf16 / fp16 "
        "(16-bit model) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        e8 = f"{c.err8:.4f}" if c.err8 is not None else ""
        e4 = f"{c.err4:.4f}" if c.err4 is not None else ""
        r4 = f"{c.rtn4:.4f}" if c.rtn4 is not None else ""
        result = "ok" if c.ok else f"{c.status}: {c.reason}".replace("|", "/")
        dt = ""
        if c.dtype_err16:
            cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731  "-": the 16-bit model does not run
            dt = " / ".join(cell(c.dtype_err.get(k)) for k in c.dtype_err16)
            dt += " (" + " / ".join(cell(v) for v in c.dtype_err16.values()) + ")"
        lines.append(f"| {c.model_type} | {result} | {c.how} | {e8} | {e4} | {r4} | {dt} |")
    return "\n".join(lines)
