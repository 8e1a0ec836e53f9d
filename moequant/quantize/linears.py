"""Optional quantization of the non-expert Linears of a decoder layer (attention, shared experts, dense MLPs)
and of lm_head: all at one fixed spec (--non-expert SPEC), or each at its planned spec (--non-expert auto).
Routers and the family's gating Linears are never quantized.

Hessians come from one forward pass of the layer over the calibration activations with hooks on every target
Linear; each Linear is then quantized alone (GPTQ per matrix, E = 1) and replaced by a QuantLinear.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moequant.arch import MoEArch, non_expert_linears
from moequant.calibration.capture import LayerInputs, run_layer
from moequant.config import QuantizeConfig, QuantSpec
from moequant.modules.qlinear import QuantLinear
from moequant.quantize.hessian import HessianAccumulator
from moequant.quantize.methods import HandlerOptions, needs_hessian, quantize_stack
from moequant.quantize.rows import LinearRow


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


@torch.no_grad()
def quantize_linears(
    root: nn.Module,
    specs: dict[str, QuantSpec],
    feed,
    config: QuantizeConfig,
    storage_dtype: torch.dtype,
) -> list[LinearRow]:
    """Quantize the Linears of `root` named in `specs`, each at its spec; `feed()` runs the calibration data
    through `root` once (every Linear's Hessian from the same pass)."""
    linears = {n: root.get_submodule(n) for n in specs}
    accs, handles = {}, []
    for n, lin in linears.items():
        if needs_hessian(specs[n].method):
            accs[n] = HessianAccumulator(1, lin.in_features)

            def hook(module, args, n=n):
                x = args[0]
                accs[n].add(0, x.reshape(-1, x.shape[-1]).float())

            handles.append(lin.register_forward_pre_hook(hook))
    if handles:
        try:
            feed()
        finally:
            for h in handles:
                h.remove()
    options = HandlerOptions(config.gptq, storage_dtype)
    rows = []
    for n, lin in linears.items():
        spec = specs[n]
        W = lin.weight.data.float()[None]  # [1, out, in]
        H = accs[n].finalize() if n in accs else None  # [1, in, in]
        mods, diag = quantize_stack(W, H, spec, options)
        bias = None if lin.bias is None else lin.bias.data.to(storage_dtype).clone()
        _replace(root, n, QuantLinear(mods[0], lin.in_features, lin.out_features, bias))
        err = (W[0] - mods[0].dequantize()).norm() / W[0].norm().clamp(min=1e-30)
        rows.append(LinearRow(n, spec.method.value, spec.bits, round(float(err), 6), diag[0]))
    return rows


def layer_linear_specs(plan, arch: MoEArch, layer_idx: int, layer: nn.Module) -> dict[str, QuantSpec]:
    """{name relative to the layer: spec} of the layer's non-expert Linears the plan quantizes."""
    prefix = f"{arch.layers}.{layer_idx}."
    full = plan.linear_specs([prefix + n for n in non_expert_linears(layer, arch)])
    return {n.removeprefix(prefix): s for n, s in full.items()}


def quantize_layer_linears(
    layer, arch: MoEArch, layer_idx: int, inputs: LayerInputs, specs: dict[str, QuantSpec], config, storage_dtype,
    experts,
):  # fmt: skip
    """`experts`: a context inside which the layer runs the experts forward the calibration data goes through
    (plan/probe_experts.experts_swapped: the family's own experts forward may not run where the layer computes)."""

    def feed():
        with experts:
            for b, kwargs in enumerate(inputs.kwargs):
                run_layer(layer, inputs.batch(b), kwargs[layer_idx])

    rows = quantize_linears(layer, specs, feed, config, storage_dtype)
    return [replace(r, module=f"{arch.layers}.{layer_idx}.{r.module}") for r in rows]
