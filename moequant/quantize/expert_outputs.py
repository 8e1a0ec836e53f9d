"""The quantized experts' outputs on the recorded calibration batches: what the layer reads while it computes
the next layer's inputs (calibration/expert_io.PrecomputedExperts)."""

from __future__ import annotations

import torch

from moequant.calibration.expert_io import ExpertInputs
from moequant.kernels.reference import add_terms, routed_terms
from moequant.modules.qexperts import QuantizedExperts
from moequant.quantize.chunks import row_elems


@torch.no_grad()
def expert_outputs(qe: QuantizedExperts, feats: ExpertInputs) -> list[torch.Tensor]:
    """What `qe` returns for each recorded batch: the routed sum (kernels/reference.routed_terms) computed
    expert by expert, so every expert is dequantized once per layer instead of once per batch; the outputs
    equal qe(x, idx, w) bit for bit. Under torchrun each rank computes its own batches (LayerInputs.split) with
    every expert: each batch's products are the same as on one rank, so are its bits."""
    device = feats.x[0].device if feats.x else torch.device("cpu")
    outs = [torch.zeros(x.shape[0], qe.hidden, dtype=torch.float32, device=device) for x in feats.x]  # [T, H]
    row = row_elems(qe.hidden, qe.activation.in_rows(qe.intermediate))
    add_terms(outs, routed_terms(feats.x, feats.idx, feats.w, qe.expert_forward, range(qe.num_experts), row))
    return [o.to(feats.dtype).reshape(shape) for o, shape in zip(outs, feats.shapes, strict=True)]
