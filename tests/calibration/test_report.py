"""A profile saved (profile.json, moments.safetensors, the routing figure) and loaded back."""

import json

import torch
from helpers import random_calib

from moequant.arch.tiny import tiny_model
from moequant.calibration.profiler import ProfileConfig, profile_pass
from moequant.calibration.report import load_profile, save_profile
from moequant.checkpoint.source import open_source

QUIET = ProfileConfig(batch_size=2, progress=False)


def _profile(model, data, config=QUIET):
    return profile_pass(open_source(model), data, config)


def _data(n=6, seq=24, vocab=256, seed=0):
    return random_calib(n, seq, seed, vocab, sources=("b", "a"))


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("mixtral", seed=5)
    prof = _profile(model, _data(), QUIET)
    save_profile(prof, tmp_path)
    meta = json.loads((tmp_path / "profile.json").read_text())
    assert set(meta["layers"]) == {"0", "1"}
    layer = meta["layers"]["0"]
    assert sum(e["tokens"] for e in layer["experts"]) == layer["tokens"] * layer["top_k"]
    assert (tmp_path / "routing.png").stat().st_size > 1000
    back = load_profile(tmp_path)
    for i, s in prof.layers.items():
        assert torch.equal(back.layers[i].counts, s.counts)
        torch.testing.assert_close(back.layers[i].moments_in(), s.moments_in())
        torch.testing.assert_close(back.layers[i].moments_mid(), s.moments_mid())
