"""--damage gptq: the damage table as GPTQ's loss on the real Hessians, priced as the quantize pass runs GPTQ."""

import numpy as np
import torch
from helpers import random_calib

from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.profiler import ProfileConfig
from moequant.checkpoint.source import open_source
from moequant.config import Method, QuantSpec
from moequant.plan.config import Budget, DamageKind, PlanConfig
from moequant.plan.damage import damage_from_source
from moequant.plan.damage_gptq import _losses, damage_from_gptq, hessian_loss
from moequant.quantize.methods import HandlerOptions
from moequant.quantize.pricing import gptq_pricing

QUIET = ProfileConfig(batch_size=4, progress=False)


def test_gptq_damage_is_gptq_loss_on_the_real_hessian():
    """The table's GPTQ entries are the loss tr((W-Q)H(W-Q)^T)/2 of what GPTQ returns, below RTN's on the same
    Hessian, and the per-item damage orders widths."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 48, 64, generator=gen)  # [E, N, K]
    X = torch.randn(3, 64, 256, generator=gen) * torch.linspace(0.1, 3, 64)[None, :, None]  # [E, K, T]
    H = 2 * X @ X.mT / 256  # [E, K, K]
    pricing = gptq_pricing()
    for b in (2, 3, 4):
        g = _losses(W, H, QuantSpec(Method.GPTQ, b, 32), pricing)
        r = _losses(W, H, QuantSpec(Method.RTN, b, 32), pricing)
        assert (g < r).all(), b
    mods, _ = pricing.quantize(W, H.clone(), QuantSpec(Method.GPTQ, 3, 32))
    Q = torch.stack([m.dequantize(torch.float32) for m in mods])
    # GPTQ reports the loss on its damped Hessian H + damp I (damp = 1% of mean diag H): a little above
    got, exact = _losses(W, H, QuantSpec(Method.GPTQ, 3, 32), pricing), hessian_loss(W, Q, H)
    damp = 0.01 * H.diagonal(dim1=1, dim2=2).mean(1).double()  # [E]
    np.testing.assert_allclose(
        got.numpy(), (exact + damp * ((W - Q).double() ** 2).sum((1, 2)) / 2).numpy(), rtol=2e-3
    )
    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, random_calib(), QUIET)
    cfg = PlanConfig(
        budget=Budget(bits=3.0), group_size=32, layer_probe=False, damage=DamageKind.GPTQ, progress=False
    )
    table = damage_from_gptq(open_source(model), prof, cfg, random_calib(), gptq_pricing(), batch_size=4)
    proxy = damage_from_source(open_source(model), prof, cfg)
    assert table.damage.shape == proxy.damage.shape and table.keys == proxy.keys
    d = table.damage[..., :-1]  # integer widths 2, 3, 4, 8 (last column: keep, zero)
    assert (np.diff(d, axis=-1) < 0).all()  # more bits, less loss, for every projection
    assert (table.damage[..., -1] == 0).all()
    plan = api.plan(model, prof, cfg, random_calib())
    assert plan.average_bits() <= 3.0 + 1e-9


def test_gptq_damage_runs_gptq_as_the_quantize_pass_does(monkeypatch):
    """The table prices GPTQ with the quantize pass's own options (act-order with static groups by default):
    before, it priced GPTQ without act-order while the quantize pass ran with it."""
    import moequant.quantize.pricing as pr
    from moequant.config import QuantizeConfig

    seen, real = [], pr.quantize_stack
    monkeypatch.setattr(
        pr, "quantize_stack", lambda W, H, spec, opts: seen.append(opts) or real(W, H, spec, opts)
    )
    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, random_calib(), QUIET)
    cfg = PlanConfig(
        budget=Budget(bits=3.0), group_size=32, layer_probe=False, damage=DamageKind.GPTQ, progress=False
    )
    damage_from_gptq(open_source(model), prof, cfg, random_calib(), gptq_pricing(), batch_size=4)
    quantize_pass = HandlerOptions(QuantizeConfig().gptq, torch.bfloat16)
    assert seen and all(o == quantize_pass for o in seen)
    assert quantize_pass.gptq.act_order and quantize_pass.gptq.static_groups


def test_signround_is_priced_by_what_it_learns():
    """With --method signround the table prices each integer width by the loss of what signround stores (its
    GPTQ start learned against the routed sum), not by the start alone."""
    from dataclasses import replace

    from moequant.config import QuantizeConfig, SignRoundOptions

    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, random_calib(), QUIET)
    cfg = PlanConfig(
        budget=Budget(bits=3.0), group_size=32, layer_probe=False, damage=DamageKind.GPTQ, progress=False,
        method=Method.SIGNROUND,
    )  # fmt: skip
    pricing = gptq_pricing(QuantizeConfig(signround=SignRoundOptions(steps=20, batch_tokens=64)))
    learned = damage_from_gptq(open_source(model), prof, cfg, random_calib(), pricing, batch_size=4)
    start = damage_from_gptq(
        open_source(model),
        prof,
        cfg,
        random_calib(),
        replace(pricing, learns_experts=lambda m: False),
        batch_size=4,
    )
    d, s = learned.damage[..., :-1], start.damage[..., :-1]  # integer widths (last column: keep, zero)
    assert np.isfinite(d).all() and (d > 0).all() and (learned.damage[..., -1] == 0).all()
    assert not np.allclose(d, s)  # the learned candidates are priced, not the GPTQ start
    assert (d[..., 0] > d[..., -1]).all()  # 2 bits still cost more than 8
