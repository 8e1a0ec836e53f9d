"""One registered handler per storage method; the pipeline never branches on the method.

A handler quantizes a stack of experts' matrices that share one QuantSpec:
    handler(W [E, N, K] float32, H [E, K, K] float32 | None, spec, options) -> (storage modules, diagnostics)
Storage modules are those of qlinear.py; diagnostics is one dict per expert for quant_report.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from moequant.config import GPTQOptions, Method, QuantSpec
from moequant.modules.qlinear import DenseWeight, PackedWeight


@dataclass(frozen=True)
class HandlerOptions:
    """What a handler needs beyond the spec: the quantize config's GPTQ options, as they are, and two facts of
    the call site."""

    gptq: GPTQOptions = GPTQOptions()
    keep_dtype: torch.dtype = torch.bfloat16  # storage dtype of "keep" experts
    consume_hessian: bool = False  # the caller hands H over: GPTQ may free it once factored (gptq_quantize)


Handler = Callable[
    [torch.Tensor, torch.Tensor | None, QuantSpec, HandlerOptions], tuple[list[nn.Module], list[dict]]
]


@dataclass(frozen=True)
class _Entry:
    handler: Handler
    needs_hessian: bool
    learns_experts: bool  # the chunk driver then learns the stored result against the experts' outputs


_HANDLERS: dict[Method, _Entry] = {}


def register_method(method: Method, needs_hessian: bool = False, learns_experts: bool = False):
    def wrap(fn: Handler) -> Handler:
        _HANDLERS[method] = _Entry(fn, needs_hessian, learns_experts)
        return fn

    return wrap


def needs_hessian(method: Method) -> bool:
    return _HANDLERS[method].needs_hessian


def learns_experts(method: Method) -> bool:
    """The handler's result is only a start point: the chunk driver learns it against the expert outputs on
    the routed tokens (quantize/signround.py)."""
    return _HANDLERS[method].learns_experts


def needs_tokens(method: Method) -> bool:
    """The method reads calibration tokens (an expert with too few routed tokens falls back to RTN)."""
    return needs_hessian(method) or learns_experts(method)


_ERR_SUMS = "_err_sums"  # a handler's diagnostic that quantize_stack hands out apart (never reported)


def quantize_stack(
    W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, options: HandlerOptions
) -> tuple[list[nn.Module], list[dict]]:
    return quantize_stack_measured(W, H, spec, options)[:2]


def quantize_stack_measured(
    W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, options: HandlerOptions
) -> tuple[list[nn.Module], list[dict], list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """quantize_stack, and each matrix's (sum (W - Q)^2, sum W^2) where the method summed them on the way
    (GPTQ's column loop), else None (quantize/weight_error.err_sums computes them from the storage)."""
    mods, diags = _HANDLERS[spec.method].handler(W, H, spec, options)
    return mods, diags, [d.pop(_ERR_SUMS, None) for d in diags]


@register_method(Method.GPTQ, needs_hessian=True)
def _gptq(W, H, spec, options):
    from moequant.quantizers.gptq import gptq_quantize

    res = gptq_quantize(W, H, spec, options.gptq, consume_hessian=options.consume_hessian)
    mods = [PackedWeight.from_packed(res.packed(e), spec) for e in range(W.shape[0])]
    diag = [
        {"gptq_loss": float(res.losses[e]), "damp": float(res.damp[e])} if res.losses is not None else {}
        for e in range(W.shape[0])
    ]
    if res.err_sums is not None:
        for e, d in enumerate(diag):
            d[_ERR_SUMS] = (res.err_sums[e, 0], res.err_sums[e, 1])
    return mods, diag


@register_method(Method.SIGNROUND, needs_hessian=True, learns_experts=True)
def _signround_start(W, H, spec, options):
    """GPTQ, SignRound's first candidate, with contiguous groups (no g_idx): the one storage both candidates
    share (quantize/signround.py)."""
    return _gptq(W, H, spec, replace(options, gptq=replace(options.gptq, static_groups=True)))


@register_method(Method.RTN)
def _rtn(W, H, spec, options):
    from moequant.quantizers.rtn import rtn_quantize

    res = rtn_quantize(W.float(), spec.bits, spec.group_size, spec.sym)
    return [PackedWeight.from_packed(res.packed(e), spec) for e in range(W.shape[0])], [
        {} for _ in range(W.shape[0])
    ]


@register_method(Method.KEEP)
def _keep(W, H, spec, options):
    return [DenseWeight.from_weight(W[e], options.keep_dtype) for e in range(W.shape[0])], [
        {} for _ in range(W.shape[0])
    ]


def _bnb(W, H, spec, options):
    from moequant.modules.bnb_storage import BnbWeight

    return [BnbWeight.quantize(W[e], spec.method) for e in range(W.shape[0])], [{} for _ in range(W.shape[0])]


for _m in (Method.BNB_NF4, Method.BNB_FP4, Method.BNB_INT8):
    register_method(_m)(_bnb)
