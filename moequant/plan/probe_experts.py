"""An experts module that reads its weights chunk by chunk and has a backward: what the streamed probe runs.

`ChunkedExperts` stands in for a fused experts module (the standard interface: hidden states, top-k ids,
top-k weights in; the weighted sum of the routed experts' outputs out). Its weights are never held whole:
forward and backward each read the layer's experts a chunk at a time (the checkpoint's 16-bit tensors,
upcast one chunk to float32), so the probe's peak is one chunk of experts, as in the other streamed passes.

    y_t = sum_k w_tk f_e(x_t),  f_e(x) = down_e act(gate_up_e x + b_e) + d_e,  e = idx_tk      (forward)
    dL/dx_t = sum_k w_tk J_e(x_t)^T g_t,  dL/dw_tk = f_e(x_t) . g_t                              (backward)

The backward needs the gradient with respect to the hidden states only, never the weights. With
h = gate_up_e x + b_e (the pre-activation, kept by the forward) and q = down_e^T g:

    dL/dw_tk = act(h) . q + d_e . g,   dL/dx_t = w_tk gate_up_e^T act'(h)^T q                     (backward)

one down and one gate/up product per expert and label draw (the activation's own derivative by autograd,
elementwise). The forward keeps h while it fits `keep_mb` (the probe calls the backward once per label
draw, so every draw reuses it); past that, the backward recomputes h from x. With `rtn` set, every expert
of the chunk is first rounded to that width (RTN, group-wise on the canonical matrices): the perturbed layer
the probe compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moequant.arch import MoEArch, apply_activation, experts_call_args
from moequant.arch.base import ExpertWeights
from moequant.checkpoint.source import Source
from moequant.kernels.reference import add_terms, routed_terms
from moequant.quantizers.rtn import rtn_roundtrip


@dataclass(frozen=True)
class Rounding:
    """RTN at `bits` applied to every expert of the layer (to the projections named: gate/up, down or both)."""

    bits: int
    group_size: int
    sym: bool
    projections: tuple[str, ...] = ("gate_up", "down")


def expert_reader(source: Source, arch: MoEArch, layer_idx: int, experts: torch.nn.Module) -> Callable:
    """part -> canonical float32 weights of those experts: read from the checkpoint for a lazily loaded layer
    (16-bit as stored, one chunk), sliced from the module's own tensors otherwise."""
    if source.lazy_experts:
        biases = (
            {n: getattr(experts, n) for n in (f"{arch.in_proj}_bias", "down_proj_bias")}
            if arch.has_bias
            else {}
        )

        def read(part: list[int]) -> ExpertWeights:
            fused = source.read_experts(layer_idx, part) | {n: b[part] for n, b in biases.items()}
            return arch.canonical_from_fused(fused)

    else:
        whole = arch.expert_weights(experts)  # views of the loaded module's tensors

        def read(part: list[int]) -> ExpertWeights:
            return ExpertWeights(*(None if t is None else t[part] for t in (
                whole.gate_up, whole.down, whole.gate_up_bias, whole.down_bias)))  # fmt: skip

    return read


class _Runner:
    """The chunk loop shared by forward and backward."""

    def __init__(self, arch, read, num_experts: int, hidden: int, inter: int, act_params: dict, chunk_mb: float,
                 rtn: Rounding | None, keep_mb: float = 0.0):  # fmt: skip
        self.arch, self.read, self.num_experts, self.act_params, self.rtn = (
            arch,
            read,
            num_experts,
            act_params,
            rtn,
        )
        per_expert = 4 * (arch.activation.in_rows(inter) + inter) * hidden  # float32 gate/up (or up) and down
        self.size = max(1, int(chunk_mb * 2**20 // per_expert))
        self.keep_rows = int(
            keep_mb * 2**20 // (4 * arch.activation.in_rows(inter))
        )  # pre-activation rows kept

    def chunks(self):
        """(part, gate_up [Ec, 2I, H], down [Ec, H, I], gate_up bias [Ec, 2I] | None, down bias [Ec, H] | None)
        in float32, rounded when self.rtn."""
        for c in range(0, self.num_experts, self.size):
            part = list(range(c, min(c + self.size, self.num_experts)))
            w = self.read(part)
            gu, dn = w.gate_up.float(), w.down.float()  # [Ec, 2I, H], [Ec, H, I]
            gub = None if w.gate_up_bias is None else w.gate_up_bias.float()
            db = None if w.down_bias is None else w.down_bias.float()
            del w  # the 16-bit chunk
            if (
                self.rtn is not None
            ):  # expert by expert, in place: temporaries of one expert, not of the chunk
                r = self.rtn
                for j in range(len(part)):
                    if "gate_up" in r.projections:
                        gu[j] = rtn_roundtrip(gu[j], r.bits, r.group_size, r.sym)  # [2I, H]
                    if "down" in r.projections:
                        dn[j] = rtn_roundtrip(dn[j], r.bits, r.group_size, r.sym)  # [H, I]
            yield part, gu, dn, gub, db
            del gu, dn

    @staticmethod
    def pre(x, gu, gub) -> torch.Tensor:
        """h = gate_up_e x (+ b_e) for tokens x [Te, H] of one expert -> [Te, 2I]."""
        h = x @ gu.T  # [Te, 2I]
        return h if gub is None else h + gub

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return apply_activation(self.arch.activation, h, self.act_params)  # [Te, I]

    def routed(self, idx: torch.Tensor, e: int):
        return torch.where(idx == e)  # (token, slot) per routing of expert e

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, kept: dict | None) -> torch.Tensor:
        """The routed sum [T, H]; each expert's pre-activation h into `kept` (while it fits) when given."""
        out = torch.zeros_like(x)  # [T, H]
        budget = [self.keep_rows if kept is not None else 0]
        for part, gu, dn, gub, db in self.chunks():
            row = {e: j for j, e in enumerate(part)}

            def run(e, xs, row=row, gu=gu, dn=dn, gub=gub, db=db):  # expert e of this chunk on its tokens
                j = row[e]
                ys = []
                for xe in xs:
                    h = self.pre(xe, gu[j], None if gub is None else gub[j])  # [Te, 2I]
                    if h.shape[0] <= budget[0]:
                        kept[e], budget[0] = h, budget[0] - h.shape[0]
                    y = self.act(h) @ dn[j].T  # [Te, H]
                    ys.append(y if db is None else y + db[j])
                return ys

            add_terms([out], routed_terms([x], [idx], [w], run, part))
        return out

    def backward(self, x, idx, w, g, kept: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL/dx [T, H], dL/dw [T, k]) for the cotangent g [T, H] (see the module docstring)."""
        gx, gw = torch.zeros_like(x), torch.zeros_like(w)  # [T, H], [T, k]
        for part, gu, dn, gub, db in self.chunks():
            for j, e in enumerate(part):
                tok, pos = self.routed(idx, e)
                if not tok.numel():
                    continue
                h = kept.get(e)
                if h is None:
                    h = self.pre(x[tok], gu[j], None if gub is None else gub[j])  # [Te, 2I]
                ge = g[tok]  # [Te, H]
                q = ge @ dn[j]  # [Te, I] down^T g
                with torch.enable_grad():
                    hr = h.detach().requires_grad_(True)
                    a = self.act(hr)  # [Te, I]
                    (dh,) = torch.autograd.grad(a, hr, q * w[tok, pos, None])  # [Te, 2I]
                gx.index_add_(0, tok, dh @ gu[j])  # [Te, H]
                s = (a.detach() * q).sum(-1)  # [Te] act(h) . down^T g
                gw[tok, pos] = s if db is None else s + ge @ db[j]
        return gx, gw


class _ChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, idx, runner, keep):  # x [T, H] float32, w [T, k] float32, idx [T, k] int64
        ctx.runner = runner
        ctx.kept = {} if keep else None  # expert -> pre-activation [Te, 2I], reused by every backward call
        ctx.save_for_backward(x, w, idx)
        return runner.forward(x, idx, w, ctx.kept)

    @staticmethod
    def backward(ctx, g):  # g [T, H]
        x, w, idx = ctx.saved_tensors
        gx, gw = ctx.runner.backward(x, idx, w, g, ctx.kept or {})
        return gx, gw, None, None, None


class ChunkedExperts(torch.nn.Module):
    """Stands in for layer `layer_idx`'s experts module (see module docstring). Attribute reads it does not
    answer go to the original module (the source looks up the experts' parameter shapes by name)."""

    def __init__(
        self,
        source: Source,
        arch: MoEArch,
        ref,
        chunk_mb: float = 256,
        rtn: Rounding | None = None,
        keep_mb: float = 0.0,
    ):
        super().__init__()
        object.__setattr__(self, "_original", ref.experts)  # not a submodule
        hidden, inter = arch.expert_dims(ref.experts)
        read = expert_reader(source, arch, ref.layer_idx, ref.experts)
        self.runner = _Runner(arch, read, ref.num_experts, hidden, inter, arch.activation_params(ref.experts),
                              chunk_mb, rtn, keep_mb)  # fmt: skip

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args, **kwargs):
        x, idx, w = experts_call_args(args, kwargs)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()  # [T, H]
        keep = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)  # a backward will follow
        out = _ChunkedFn.apply(x2, w.reshape(x2.shape[0], -1).float(), idx.reshape(x2.shape[0], -1).long(),
                               self.runner, keep)  # fmt: skip
        return out.to(dtype).reshape(shape)
