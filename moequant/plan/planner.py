"""The planner's entry points: a profile and a budget in, a Plan out.

    table = damage_for(model, profile, config, data)     # damage table, calibrated by the layer probe
    plan = solve(table, config.budget)                   # knapsack.py; one table serves every budget
    plan = make_plan(model, profile, config, data)       # the two in one call (what `moequant plan` runs)

`profile` is a fresh calibration.profiler.Profile or one read back with calibration.report.load_profile.
"""

from __future__ import annotations

import dataclasses

from moequant.calibration.data import CalibData
from moequant.calibration.profiler import Profile
from moequant.checkpoint.source import expert_dims, layer_experts, open_source
from moequant.config import QuantSpec
from moequant.errors import PlanError
from moequant.plan import probe
from moequant.plan.config import DamageKind, PlanConfig, ProbeKind
from moequant.plan.damage import DamageTable, damage_from_source
from moequant.plan.damage_gptq import GPTQPricing, damage_from_gptq
from moequant.plan.knapsack import solve, uniform_plan
from moequant.plan.schema import Plan
from moequant.runtime.timing import timed


def damage_for(
    model,
    profile: Profile,
    config: PlanConfig,
    data: CalibData | None,
    source=None,
    trust_remote_code: bool = False,
    device=None,
    pricing: GPTQPricing | None = None,
) -> DamageTable:
    """The damage table of `model` (object, folder or None for the bundled model) for the config's widths,
    calibrated per layer by the probe when config.layer_probe (on the first config.probe_samples sequences of
    `data`): streamed, whatever the model's size, or measured on the whole model when it fits under
    config.probe_max_gb. `pricing`: the quantize stage's GPTQ, which `--damage gptq` needs
    (moequant.quantize.pricing.gptq_pricing; the API passes it)."""
    source = source or open_source(
        model, trust_remote_code=trust_remote_code, lazy_experts=True, device=device
    )
    if config.non_expert_auto and data is None:
        raise PlanError("--non-expert auto prices attention with the layer probe: give calibration data")
    if config.damage is DamageKind.GPTQ:
        if data is None:
            raise PlanError(
                "--damage gptq prices items on the calibration data's Hessians: give calibration data"
            )
        if pricing is None:
            raise PlanError("--damage gptq runs the quantize stage's GPTQ: pass pricing=gptq_pricing()")
        whole = open_source(model, trust_remote_code=trust_remote_code, device=device)  # whole layers
        with timed("damage"):
            table = damage_from_gptq(whole, profile, config, data, pricing)
    else:
        with timed("damage"):
            table = damage_from_source(source, profile, config)
    if config.layer_probe and data is not None and config.probe is ProbeKind.STREAMED:
        with timed("probe"):
            table = probe.calibrate_streamed(table, source, data)
    elif config.layer_probe and data is not None:
        with timed("probe"):
            full, skipped = probe.whole_model(model, source, config.probe_max_gb)
            if full is not None:
                table = probe.calibrate(table, full, data)
            else:
                table = dataclasses.replace(table, probe={"probe": skipped})
    return table


def make_plan(
    model,
    profile: Profile,
    config: PlanConfig,
    data: CalibData | None,
    act_order: bool = False,
    source=None,
    trust_remote_code: bool = False,
    device=None,
    pricing: GPTQPricing | None = None,
) -> Plan:
    """The least-damage plan within config.budget (act_order: the plan counts stored g_idx bytes); `device`:
    where the probe computes (None: CUDA when available, else CPU), when no `source` is given."""
    table = damage_for(model, profile, config, data, source, trust_remote_code, device, pricing)
    return solve(table, config.budget, act_order)


def make_uniform_plan(
    model, spec: QuantSpec, act_order: bool = False, trust_remote_code: bool = False
) -> Plan:
    """Every expert of `model` at `spec` (the baseline a budgeted plan must beat)."""
    source = open_source(model, trust_remote_code=trust_remote_code, device="cpu")  # shapes only
    hidden, inter = expert_dims(source)
    arch = source.arch
    return uniform_plan(
        arch.model_type, layer_experts(source), hidden, inter, spec, act_order, arch.activation.gated
    )
