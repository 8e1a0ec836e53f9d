"""The Python API: one entry point per step, each with its config object; the CLI is a thin layer over it.

    from moequant import api
    from moequant.plan.config import Budget, PlanConfig

    tok = api.load_tokenizer(None)                       # None: the bundled tiny MoE
    data = api.calibration(tok, api.CalibConfig(samples=16, seq_len=128))  # calibration token windows
    prof = api.profile(None, data)                       # routing statistics, layer by layer
    plan = api.plan(None, prof, PlanConfig(Budget(bits=3.0)), data)
    summary = api.quantize(None, plan, data, "out")      # checkpoint folder (with its model card)
    model = api.load("out")                              # transformers model on the quantized experts

`model` is an nn.Module (worked on in memory), a checkpoint folder, a Hugging Face Hub id (downloaded at its
main revision into the Hub cache: config, tokenizer, safetensors; `resolve_model(id, revision=...)` picks
another revision and returns the folder), or None for the bundled model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from moequant.calibration.data import CalibConfig, CalibData, build_calibration
from moequant.calibration.profiler import Profile, ProfileConfig, profile_pass
from moequant.calibration.report import load_profile
from moequant.checkpoint.hub_source import local_model, resolve_model
from moequant.checkpoint.loading import load_model
from moequant.checkpoint.loading import load_tokenizer as _load_tokenizer
from moequant.checkpoint.source import model_id, open_source
from moequant.config import QuantizeConfig
from moequant.errors import MoEQuantError
from moequant.plan.config import PlanConfig
from moequant.plan.planner import make_plan
from moequant.plan.planner import make_uniform_plan as _make_uniform_plan
from moequant.plan.schema import Plan
from moequant.quantize import run
from moequant.quantize.pricing import gptq_pricing
from moequant.quantize.summary import QuantizeSummary
from moequant.runtime.timing import timed

__all__ = [
    "CalibConfig",
    "ProfileConfig",
    "QuantizeSummary",
    "calibration",
    "load",
    "load_profile",
    "load_tokenizer",
    "make_plan_for",
    "make_uniform_plan",
    "open_source",
    "plan",
    "profile",
    "quantize",
    "resolve_model",
]

logger = logging.getLogger(__name__)

load = load_model  # load(folder, device=None, dtype=None): a saved checkpoint, quantized or not


def _local(model):
    """A model object as is; a name or path as a local folder (a Hub id downloaded, see hub_source.py)."""
    return local_model(model) if isinstance(model, str | Path) else model


def load_tokenizer(model, trust_remote_code: bool = False):
    """The model's tokenizer (checkpoint/loading.py load_tokenizer)."""
    return _load_tokenizer(_local(model), trust_remote_code)


def make_uniform_plan(model, spec, act_order: bool = False, trust_remote_code: bool = False) -> Plan:
    """Every expert of `model` at `spec` (plan/planner.py make_uniform_plan)."""
    return _make_uniform_plan(_local(model), spec, act_order=act_order, trust_remote_code=trust_remote_code)


def calibration(tokenizer, config: CalibConfig = CalibConfig()) -> CalibData:
    return build_calibration(tokenizer, config)


def profile(
    model,
    data: CalibData,
    config: ProfileConfig = ProfileConfig(),
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> Profile:
    """Routing profile of a model (object or checkpoint), layer by layer. `trust_remote_code`, here and in
    the steps below: a checkpoint whose config names its own model code (`auto_map`) may run it. `device`,
    here and below: where a checkpoint's layers compute (None: CUDA when available, else CPU; a model object
    computes where it is)."""
    model = _local(model)
    source = open_source(model, trust_remote_code=trust_remote_code, lazy_experts=True, device=device)
    with timed("profile"):
        return profile_pass(source, data, config, model_id=model_id(model))


def plan(
    model,
    profile: Profile,
    config: PlanConfig,
    data: CalibData | None,
    act_order: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> Plan:
    """One width per expert under config.budget, from a profile (fresh, or read back with load_profile);
    `data` feeds the per-layer loss probe (None: the uncalibrated proxy)."""
    return make_plan(
        _local(model), profile, config, data, act_order, trust_remote_code=trust_remote_code, device=device,
        pricing=gptq_pricing(),
    )  # fmt: skip


def make_plan_for(
    model,
    data: CalibData,
    config: PlanConfig,
    act_order: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    check_profile: Callable[[Profile], object] | None = None,
) -> tuple[Plan, Profile]:
    """profile() then plan() on one opened source. Returns (plan, profile). `check_profile` is called with
    the profile before the planning passes (the quantize command refuses too thin a calibration there)."""
    model = _local(model)
    # experts read chunk by chunk in every pass
    source = open_source(model, trust_remote_code=trust_remote_code, lazy_experts=True, device=device)
    with timed("profile"):
        prof = profile_pass(
            source, data, ProfileConfig(batch_size=batch_size, progress=progress), model_id(model)
        )
    if check_profile is not None:
        check_profile(prof)
    made = make_plan(
        model, prof, config, data, act_order, source=source, trust_remote_code=trust_remote_code,
        pricing=gptq_pricing(),
    )  # fmt: skip
    return made, prof


def quantize(
    model,
    plan: Plan,
    data: CalibData,
    out: str | Path,
    config: QuantizeConfig = QuantizeConfig(),
    tokenizer=None,
    profile_result: Profile | None = None,
    overwrite: bool = False,
    save_dtype: torch.dtype | None = None,
    resume: bool = False,
    trust_remote_code: bool = False,
) -> QuantizeSummary:
    """Quantize `model` per `plan` into the folder `out`, with its tokenizer and model card (see
    quantize/run.py). `tokenizer` None: the model folder's own (a model object: none is written, with a
    warning, unless given)."""
    from moequant.evals.card import write_card

    model = _local(model)
    if tokenizer is None and not isinstance(model, torch.nn.Module):
        try:
            tokenizer = _load_tokenizer(model, trust_remote_code)  # the folder the CLI writes has it too
        except MoEQuantError as err:  # calibration data given as token ids needs none: quantize, write none
            logger.warning("api.quantize: %s; %s will have no tokenizer", err, out)
    elif tokenizer is None:
        logger.warning("api.quantize: no tokenizer given for a model object; %s will have none", out)
    return run.quantize(
        model,
        plan,
        data,
        out,
        config,
        tokenizer,
        profile_result,
        overwrite,
        save_dtype,
        resume,
        (write_card,),
        trust_remote_code=trust_remote_code,
    )
