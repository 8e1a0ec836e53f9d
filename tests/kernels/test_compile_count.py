"""One compilation per format, path and tile for the whole model, not one per layer.

The bundled model is quantized with layers that share one set of formats but differ in how many experts each
format holds and in how many experts stay 16-bit (so each layer packs a different number of experts). The
fused launches every layer would make are recorded (kernels/backend.record_launches: nothing runs) on the
routing the model really produces, and keyed as Triton keys its compiled-kernel cache (cache_key below).
Every layer must hit the keys of the first: a per-layer count in a constexpr, or an integer argument Triton
specialises on, would give each layer its own compilation and fail this.
"""

import inspect

import torch

from moequant import api
from moequant.calibration.data import CalibData
from moequant.checkpoint.loading import load_model
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.kernels.backend import record_launches
from moequant.kernels.moe import _triton_moe

FOUR = QuantSpec(Method.RTN, 4, 32)
THREE = QuantSpec(Method.RTN, 3, 32, sym=True)
KEEP = QuantSpec(Method.KEEP, 16)


def _params(kernel) -> tuple[list[str], set[str], set[str]]:
    """(argument names, constexpr names, do_not_specialize names) of a jitted kernel, compiled or interpreted."""
    if hasattr(kernel, "params"):  # JITFunction
        names = [p.name for p in kernel.params]
        const = {p.name for p in kernel.params if p.is_constexpr}
        dns = {p.name for p in kernel.params if p.do_not_specialize}
        return names, const, dns
    # InterpretedFunction: the Python function and the decorator's keywords
    sig = inspect.signature(kernel.fn).parameters
    names = list(sig)
    const = {n for n, p in sig.items() if "constexpr" in str(p.annotation)}
    dns = set(kernel.kwargs.get("do_not_specialize") or [])
    return names, const, dns


def cache_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton keys its compiled-kernel cache on for one launch, as far as this launch decides it: the
    kernel, every constexpr value, the launch options, each argument's type, and for integer arguments it
    specialises on (those not in do_not_specialize) whether the value is 1 or a multiple of 16. Two launches
    with different keys compile twice. (Pointer alignment, also in Triton's key, is 16 bytes for every
    tensor torch allocates and is left out.)"""
    names, const, dns = _params(kernel)
    values = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    key = []
    for name in names:
        v = values[name]
        if name in const:
            key.append((name, "constexpr", str(v)))
        elif isinstance(v, torch.Tensor):
            key.append((name, str(v.dtype)))
        elif isinstance(v, bool):
            key.append((name, "i1"))
        elif isinstance(v, int):
            width = "i32" if -(2**31) <= v < 2**31 else "i64"
            key.append((name, width) if name in dns else (name, width, v == 1, v % 16 == 0))
        else:
            key.append((name, type(v).__name__))
    opts = tuple(sorted((k, v) for k, v in kwargs.items() if k in ("num_warps", "num_stages")))
    return (getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(key), opts)


def _mixed_model(tmp_path, layer_specs):
    model = load_model(None)  # bundled, fp32, 8 experts per layer
    plan = api.make_uniform_plan(model, FOUR)
    for i in plan.layers:
        plan.layers[i] = layer_specs[i % len(layer_specs)]
    g = torch.Generator().manual_seed(0)
    calib = CalibData(torch.randint(0, 4096, (2, 32), generator=g), ["x"] * 2, "random")
    api.quantize(model, plan, calib, str(tmp_path / "q"), QuantizeConfig(progress=False, min_tokens=0))
    return model


def _experts_calls(model, ids):
    """(module, x, top_k_index, top_k_weights) of every quantized experts call of one forward."""
    calls, hooks = [], []
    for m in model.modules():
        if getattr(m, "is_moequant_experts", False):
            hooks.append(m.register_forward_pre_hook(lambda mod, a: calls.append((mod, *a))))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _keys(call) -> set:
    mod, x, idx, w = call
    with record_launches() as records:
        _triton_moe(
            x, idx, w, mod._packed_layout(), mod.activation, mod.act_params, mod.gate_up_bias, mod.down_bias,
            None,
        )  # fmt: skip
    return {cache_key(kernel, args, kwargs) for kernel, _grid, args, kwargs in records}


def test_layers_with_different_mixes_share_compilations(tmp_path):
    layer_specs = [
        [FOUR] * 4 + [THREE] * 4,  # 8 packed
        [FOUR] * 6 + [THREE] + [KEEP],  # 7 packed
        [FOUR, THREE, THREE, KEEP, KEEP, KEEP, THREE, FOUR],  # 5 packed
        [THREE] * 2 + [FOUR] + [KEEP] * 5,  # 3 packed
    ]
    model = _mixed_model(tmp_path, layer_specs)
    g = torch.Generator().manual_seed(1)
    for ids in (torch.randint(0, 4096, (1, 1), generator=g), torch.randint(0, 4096, (2, 48), generator=g)):
        calls = _experts_calls(model, ids)
        assert len(calls) == 4
        packed = [c[0]._packed_layout().num_global for c in calls]
        assert packed == [8, 7, 5, 3]
        first = _keys(calls[0])
        every = set().union(*(_keys(c) for c in calls))
        assert every == first, f"{len(every)} compilations for {len(calls)} layers, {len(first)} for one"
        # the key does tell formats apart: both gemms compile once per format, and the batch path shows
        kernels = sorted(k[0] for k in first)
        assert kernels.count("gemm1_kernel") == kernels.count("gemm2_kernel") == 2
        assert ("count_kernel" in kernels) == (ids.numel() > 1)


def test_another_format_is_another_compilation(tmp_path):
    """The positive control: the key is not blind. A layer with a width the others lack compiles anew."""
    two = QuantSpec(Method.RTN, 2, 32)
    model = _mixed_model(tmp_path, [[FOUR] * 4 + [THREE] * 4, [FOUR] * 4 + [two] * 4])
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(2))
    calls = _experts_calls(model, ids)
    a, b = _keys(calls[0]), _keys(calls[1])
    assert a != b and len(a | b) == len(a) + 2  # the 2-bit gemm1 and gemm2
