"""The quantized experts' outputs on the recorded calibration batches: what the layer reads while it computes
the next layer's inputs (calibration/expert_io.PrecomputedExperts)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from moequant.calibration.expert_io import ExpertInputs
from moequant.kernels.reference import add_terms, routed_terms
from moequant.modules.qexperts import QuantizedExperts
from moequant.quantize.chunks import row_elems


@dataclass
class DownInputs:
    """The down inputs act(gate/up(x)) that the down Hessians computed (expert_hessians.down_hessians), kept
    for the layer's outputs: per expert, one [Te, I] float32 for each batch among `batches` (global indices,
    the ones this process computes outputs for) that routes to it, in batch order."""

    batches: frozenset[int]
    acts: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, e: int, batch: int, act: torch.Tensor) -> None:
        if batch in self.batches:
            self.acts.setdefault(e, []).append(act)


@torch.no_grad()
def expert_outputs(
    qe: QuantizedExperts, feats: ExpertInputs, down_inputs: DownInputs | None = None
) -> list[torch.Tensor]:
    """What `qe` returns for each recorded batch: the routed sum (kernels/reference.routed_terms) computed
    expert by expert, so every expert is dequantized once per layer instead of once per batch; the outputs
    equal qe(x, idx, w) bit for bit. Under torchrun each rank computes its own batches (LayerInputs.split) with
    every expert: each batch's products are the same as on one rank, so are its bits.

    down_inputs: the kept down inputs of some experts on exactly the batches of `feats`: those experts skip
    their gate/up forward, the same arithmetic (QuantizedExperts.expert_hidden) with the same storage. It is
    emptied as its tensors are used."""
    device = feats.x[0].device if feats.x else torch.device("cpu")
    outs = [torch.zeros(x.shape[0], qe.hidden, dtype=torch.float32, device=device) for x in feats.x]  # [T, H]
    row = row_elems(qe.hidden, qe.activation.in_rows(qe.intermediate))
    fn = qe.expert_forward if down_inputs is None else _reading(qe, down_inputs.acts)
    add_terms(outs, routed_terms(feats.x, feats.idx, feats.w, fn, range(qe.num_experts), row))
    return [o.to(feats.dtype).reshape(shape) for o, shape in zip(outs, feats.shapes, strict=True)]


def _reading(qe: QuantizedExperts, down_inputs: dict[int, list[torch.Tensor]]):
    """qe.expert_forward, with the kept down inputs of the experts in `down_inputs` in place of their gate/up
    forward (taken in order, each released once used)."""
    kept = {e: deque(down_inputs.pop(e)) for e in list(down_inputs)}

    def forward(e: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        queue = kept.get(e)
        if queue is None:
            return qe.expert_forward(e, xs)
        acts = [queue.popleft() for _ in xs] if len(queue) >= len(xs) else []
        if [a.shape[0] for a in acts] != [x.shape[0] for x in xs]:
            raise RuntimeError(f"expert {e}: the kept down inputs do not match its routed tokens")
        return qe.expert_down(e, acts)

    return forward
