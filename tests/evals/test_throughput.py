"""Forward throughput: tokens/s under a fake clock (exact), and the label of the path the experts ran."""

import types

import torch

import moequant  # noqa: F401
from moequant.arch.tiny import tiny_model
from moequant.evals import throughput
from moequant.evals.throughput import backend_label, tokens_per_second


def test_tokens_per_second_is_the_median_rate_of_the_timed_passes(monkeypatch):
    """A clock that reads 10, 12 | 20, 20.5 | 30, 31: passes of 2, 0.5 and 1 s over 2 x 16 tokens. The median
    rate is 32 tokens/s exactly (a mean of rates gives 37.3, total tokens / total time 27.4); a seventh
    reading, e.g. timing the warm-up pass, fails."""
    readings = iter([10.0, 12.0, 20.0, 20.5, 30.0, 31.0])
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    model = tiny_model("mixtral", seed=0)
    calls = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("use_cache"))),
        with_kwargs=True,
    )
    assert tokens_per_second(model, batch=2, seq_len=16, repeats=3) == 32.0
    assert calls == [((2, 16), False)] * 4  # one warm-up pass, then the three timed ones
    assert next(readings, None) is None  # every reading used: two per timed pass


def test_backend_label(tmp_path):
    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.checkpoint.loading import load_model
    from moequant.config import Method, QuantizeConfig, QuantSpec

    original = load_model(None)  # the bundled model: transformers runs its fused experts
    impl = original.config._experts_implementation
    assert impl in ("grouped_mm", "batched_mm", "eager")
    assert backend_label(original) == f"cpu, transformers experts ({impl})"
    model = tiny_model("mixtral", seed=0)
    data = CalibData(
        torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 2, "ids"
    )
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    api.quantize(model, plan, data, tmp_path / "q", QuantizeConfig(progress=False), save_dtype=torch.float32)
    assert backend_label(load_model(str(tmp_path / "q"))) == "cpu, moequant reference path"
