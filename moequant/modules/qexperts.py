"""QuantizedExperts: a drop-in replacement for a transformers fused experts module.

Same call signature as the transformers experts interface, `forward(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`, with every expert stored at its own width and method. State-dict layout
(what the checkpoint holds, relative to the experts module):

    {e}.gate_up.<tensors>   canonical [gate; up] projection of expert e, (2I x H); up alone (I x H) for a
                            non-gated activation (Activation.in_rows)
    {e}.down.<tensors>      down projection of expert e, (H x I)
    gate_up_bias [E, 2I], down_bias [E, H]   (families with biases, canonical order)
    <name>.<tensors>        the replaced module's own children that hold tensors (arch.carried_modules: Ergo's
                            per-expert norm, applied by its block), under their names

Integer experts run on the fused kernels (kernels/) on CUDA or when MOEQUANT_KERNEL=triton (the choice:
kernels/backend.py); everything else, and everything on CPU by default, runs the torch reference
(kernels/reference.routed_sum): dequantize the expert, matmul in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.arch import Activation, apply_activation
from moequant.config import Spec, all_integer, proj_specs, spec_label
from moequant.kernels.backend import Backend, resolve_backend
from moequant.kernels.reference import routed_sum
from moequant.modules.qlinear import project, storage_for


class ExpertSlot(nn.Module):
    def __init__(self, gate_up: nn.Module, down: nn.Module, spec: Spec):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.spec = spec


class QuantizedExperts(nn.Module):
    is_moequant_experts = True  # arch/derive.py finds these where the fused experts were

    def __init__(
        self,
        specs: list[Spec],
        hidden: int,
        intermediate: int,
        activation: Activation,
        act_params: dict[str, float] | None = None,
        has_bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        """Empty storage for len(specs) experts (filled by from_pretrained or `set_expert`)."""
        super().__init__()
        self.num_experts = len(specs)
        self.hidden, self.intermediate = hidden, intermediate
        self.activation, self.act_params = activation, dict(act_params or {})
        self.specs = list(specs)
        self.kernel = None  # "triton" | "reference" | None (env MOEQUANT_KERNEL, else by device)
        rows = activation.in_rows(intermediate)  # the input projection: [gate; up] 2I, or up alone I
        for e, spec in enumerate(specs):
            gu_spec, dn_spec = proj_specs(spec)  # an ExpertSpec stores its projections differently
            gu = storage_for(gu_spec, rows, hidden, act_order, dtype, device)
            dn = storage_for(dn_spec, hidden, intermediate, act_order, dtype, device)
            self.add_module(str(e), ExpertSlot(gu, dn, spec))
        if has_bias:
            self.register_buffer(
                "gate_up_bias", torch.zeros(self.num_experts, rows, dtype=dtype, device=device)
            )
            self.register_buffer(
                "down_bias", torch.zeros(self.num_experts, hidden, dtype=dtype, device=device)
            )
        else:
            self.gate_up_bias = self.down_bias = None
        self._packed = None  # kernels.layout.PackedMoE, built lazily for the fused path

    def carry(self, modules: dict[str, nn.Module]) -> None:
        """Keep the replaced experts module's own tensor-holding children (arch.MoEArch.carried_modules) under
        their names, so the state dict holds the family's keys (this module does not run them)."""
        for name, module in modules.items():
            self.add_module(name, module)

    def slot(self, e: int) -> ExpertSlot:
        return self._modules[str(e)]

    def set_expert(self, e: int, gate_up: nn.Module, down: nn.Module, spec: Spec) -> None:
        self._modules[str(e)] = ExpertSlot(gate_up, down, spec)
        self.specs[e] = spec
        self._packed = None

    def extra_repr(self) -> str:
        widths: dict[str, int] = {}
        for s in self.specs:
            key = spec_label(s)
            widths[key] = widths.get(key, 0) + 1
        return f"experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, {widths}"

    # ---- forward ---------------------------------------------------------------------------------

    def backend(self, device: torch.device) -> Backend:
        """The path a forward on `device` takes (kernels/backend.py: self.kernel, MOEQUANT_KERNEL, the device);
        an activation the kernels do not fuse (a family's own function, gated or not) always takes the reference
        path."""
        if self.activation.own_function:
            return Backend.REFERENCE
        return resolve_backend(self.kernel, device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.backend(hidden_states.device) is Backend.TRITON:
            return self._forward_fused(hidden_states, top_k_index, top_k_weights)
        return self._forward_reference(hidden_states, top_k_index, top_k_weights, range(self.num_experts))

    def _forward_reference(self, x, top_k_index, top_k_weights, experts) -> torch.Tensor:
        """The reference MoE forward (kernels/reference.routed_sum) over `experts`, each on expert_forward."""
        return routed_sum(x, top_k_index, top_k_weights, self.expert_forward, experts).to(x.dtype)

    def expert_forward(self, e: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Expert e on each token set x [Te, H] float32 in xs -> [Te, H] float32 each, before the routing
        weight: the reference arithmetic. The weights are dequantized once for all of xs, in row slices
        (qlinear.project), so no float32 copy of a whole large projection exists."""
        return self.expert_down(e, self.expert_hidden(e, xs))

    def expert_hidden(self, e: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first half of expert_forward: act(gate/up(x)) [Te, I] float32 for each x [Te, H] in xs."""
        hs = project(self.slot(e).gate_up, xs)  # [Te, 2I] each
        if self.gate_up_bias is not None:
            hs = [h + self.gate_up_bias[e].float() for h in hs]
        return [apply_activation(self.activation, h, self.act_params) for h in hs]  # [Te, I] each

    def expert_down(self, e: int, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The second half of expert_forward: down(a) [Te, H] float32 for each a [Te, I] in acts."""
        ys = project(self.slot(e).down, acts)  # [Te, H] each
        if self.down_bias is not None:
            ys = [y + self.down_bias[e].float() for y in ys]
        return ys

    def _forward_fused(self, x, top_k_index, top_k_weights) -> torch.Tensor:
        from moequant.kernels.moe import quantized_moe

        packed = self._packed_layout()
        y = quantized_moe(
            x,
            top_k_index,
            top_k_weights,
            packed,
            self.activation,
            self.act_params,
            self.gate_up_bias,
            self.down_bias,
            backend="triton",
        )  # [T, H] contribution of the integer experts
        rest = [e for e, s in enumerate(self.specs) if not all_integer(s)]
        if rest:
            y = y + self._forward_reference(x, top_k_index, top_k_weights, rest)
        return y

    def _packed_layout(self):
        if self._packed is None:
            from moequant.kernels.layout import PackedMoE

            # the kernels run an expert whose projections are both integer (at any widths, each its own)
            gu = [self.slot(e).gate_up.packed() if all_integer(s) else None for e, s in enumerate(self.specs)]
            dn = [self.slot(e).down.packed() if all_integer(s) else None for e, s in enumerate(self.specs)]
            self._packed = PackedMoE.from_experts(
                gu, dn, self.num_experts, device=self.gate_up_device(), gated=self.activation.gated
            )
            self._share_packed(self._packed)
        return self._packed

    def _share_packed(self, packed) -> None:
        """Point every packed expert's buffers at its slot of the stacked layout, so each weight is held once:
        the per-expert tensors the checkpoint filled are freed, and the reference path, `state_dict` and
        `load_state_dict` read and write the kernels' tensors through these views."""
        for groups, proj in ((packed.gate_up, "gate_up"), (packed.down, "down")):
            for g in groups:
                for slot, e in enumerate(g.experts):
                    w = getattr(self.slot(e), proj)
                    w.qweight, w.scales = g.qweight[slot], g.scales[slot]  # [Kw, N], [G, N] views
                    if g.qzeros is not None:
                        w.qzeros = g.qzeros[slot]  # [G, N]
                    if g.g_idx is not None:
                        w.g_idx = g.g_idx[slot]  # [K]

    def gate_up_device(self) -> torch.device:
        return next(self.buffers()).device

    def _apply(self, fn, recurse=True):
        self._packed = None  # device or dtype moves invalidate the kernel layout
        return super()._apply(fn, recurse)
