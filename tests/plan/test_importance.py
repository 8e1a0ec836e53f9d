"""Importance of each expert from the profile: minimax over calibration sources against routed mass."""

import torch
from helpers import random_calib

from moequant import api
from moequant.arch.tiny import tiny_model
from moequant.calibration.profiler import ProfileConfig
from moequant.plan.config import Budget, Importance, PlanConfig
from moequant.plan.importance import importance

QUIET = ProfileConfig(batch_size=4, progress=False)


def test_minimax_importance_covers_every_source():
    model = tiny_model("mixtral", seed=3)
    prof = api.profile(model, random_calib(n=12, sources=("a", "b", "c")), QUIET)
    mass = PlanConfig(budget=Budget(bits=3.0), importance=Importance.MASS, importance_floor=0.0)
    mm = PlanConfig(budget=Budget(bits=3.0), importance=Importance.MINIMAX, importance_floor=0.0)
    for i, s in prof.layers.items():
        a, b = importance(prof, i, mass), importance(prof, i, mm)
        assert (b >= a - 1e-12).all() and (b > a + 1e-9).any()  # some expert is routed more by one source
        mean_w = s.weight_mass / s.counts.double().clamp(min=1)
        for src, c in s.by_source.items():  # never below what any one source routes to the expert
            rate = c.double() / (float(c.sum()) / s.top_k)
            assert (b >= rate * mean_w - 1e-12).all(), src
    one = api.profile(model, random_calib(n=8), QUIET)  # a single source: minimax is the mass
    for i in one.layers:
        assert torch.equal(importance(one, i, mass), importance(one, i, mm))
