"""The quantized experts' outputs on the recorded calibration batches: what the layer reads while it computes
the next layer's inputs (calibration/expert_io.PrecomputedExperts)."""

from __future__ import annotations

import torch

from moequant.calibration.expert_io import ExpertInputs
from moequant.kernels.reference import add_terms, routed_terms
from moequant.modules.qexperts import QuantizedExperts
from moequant.quantize.chunks import row_elems
from moequant.runtime.ranks import Ranks


@torch.no_grad()
def expert_outputs(
    qe: QuantizedExperts, feats: ExpertInputs, owner: list[int] | None = None, ranks: Ranks | None = None
) -> list[torch.Tensor]:
    """What `qe` returns for each recorded batch: the routed sum (kernels/reference.routed_terms) computed
    expert by expert, so every expert is dequantized once per layer instead of once per batch; the outputs
    equal qe(x, idx, w) bit for bit.

    With several ranks (`owner`: the rank of each expert), each rank computes its own experts' terms, every
    rank receives all of them, and each adds them up in the same ascending order: the same bits as one rank."""
    device = feats.x[0].device if feats.x else torch.device("cpu")
    outs = [torch.zeros(x.shape[0], qe.hidden, dtype=torch.float32, device=device) for x in feats.x]  # [T, H]
    row = row_elems(qe.hidden, qe.activation.in_rows(qe.intermediate))
    if ranks is None or not ranks.distributed:
        terms = routed_terms(feats.x, feats.idx, feats.w, qe.expert_forward, range(qe.num_experts), row)
    else:
        mine = [e for e in range(qe.num_experts) if owner[e] == ranks.rank]
        with ranks.guard("computing its experts' outputs"):
            own = [
                (e, b, tok.cpu(), y.cpu())
                for e, b, tok, y in routed_terms(feats.x, feats.idx, feats.w, qe.expert_forward, mine, row)
            ]
        terms = sorted((t for got in ranks.all_gather(own) for t in got), key=lambda t: t[0])  # stable
    add_terms(outs, terms)
    return [o.to(feats.dtype).reshape(shape) for o, shape in zip(outs, feats.shapes, strict=True)]
