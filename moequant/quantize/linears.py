"""Optional quantization of the non-expert Linears of a decoder layer (attention, shared experts, dense MLPs)
and of lm_head, all at one fixed spec. Routers and the family's gating Linears are never quantized.

Hessians come from one forward pass of the layer over the calibration activations with hooks on every target
Linear; each Linear is then quantized alone (GPTQ per matrix, E = 1) and replaced by a QuantLinear.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.arch import MoEArch
from moequant.calibration.capture import LayerInputs, run_layer
from moequant.config import QuantizeConfig, QuantSpec
from moequant.modules.qlinear import QuantLinear
from moequant.quantize.hessian import HessianAccumulator
from moequant.quantize.methods import HandlerOptions, needs_hessian, quantize_stack


def target_linears(layer: nn.Module, arch: MoEArch) -> list[str]:
    """Names (relative to the layer) of the nn.Linears to quantize: all but experts, routers and gates."""
    skip = [arch.experts_path, arch.router_path] + [arch.in_block(g) for g in arch.gates]
    out = []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip):
            out.append(name)
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


@torch.no_grad()
def quantize_linears(
    root: nn.Module,
    names: list[str],
    spec: QuantSpec,
    feed,
    config: QuantizeConfig,
    storage_dtype: torch.dtype,
) -> list[dict]:
    """Quantize the Linears `names` of `root`; `feed()` runs the calibration data through `root` once."""
    linears = {n: root.get_submodule(n) for n in names}
    accs, handles = {}, []
    if needs_hessian(spec.method):
        for n, lin in linears.items():
            accs[n] = HessianAccumulator(1, lin.in_features)

            def hook(module, args, n=n):
                x = args[0]
                accs[n].add(0, x.reshape(-1, x.shape[-1]).float())

            handles.append(lin.register_forward_pre_hook(hook))
        try:
            feed()
        finally:
            for h in handles:
                h.remove()
    options = HandlerOptions(
        config.act_order, config.static_groups, config.percdamp, config.blocksize, storage_dtype
    )
    rows = []
    for n, lin in linears.items():
        W = lin.weight.data.float()[None]  # [1, out, in]
        H = accs[n].finalize() if n in accs else None  # [1, in, in]
        mods, diag = quantize_stack(W, H, spec, options)
        bias = None if lin.bias is None else lin.bias.data.to(storage_dtype).clone()
        _replace(root, n, QuantLinear(mods[0], lin.in_features, lin.out_features, bias))
        err = (W[0] - mods[0].dequantize()).norm() / W[0].norm().clamp(min=1e-30)
        rows.append(
            {
                "module": n,
                "method": spec.method.value,
                "bits": spec.bits,
                "rel_weight_error": round(float(err), 6),
            }
            | diag[0]
        )
    return rows


def quantize_layer_linears(
    layer, arch: MoEArch, layer_idx: int, inputs: LayerInputs, spec, config, storage_dtype
):
    names = target_linears(layer, arch)

    def feed():
        for b, kwargs in enumerate(inputs.kwargs):
            run_layer(layer, inputs.batch(b), kwargs[layer_idx])

    rows = quantize_linears(layer, names, spec, feed, config, storage_dtype)
    for r in rows:
        r["module"] = f"{arch.layers}.{layer_idx}.{r['module']}"
    return rows
