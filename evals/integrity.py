"""Does the checkpoint still decode to what was written? Recompute each expert's relative weight error against
the baseline and compare it with the `rel_weight_error` quant_report.json recorded when the expert was
quantized. A mismatch means the stored bytes are read differently than they were written (a packing change
without a format-version bump, a wrong baseline, a corrupted file): the model loads without error, but its
experts are wrong.

    rel_weight_error(e) = sqrt((||G - G_q||^2 + ||D - D_q||^2) / (||G||^2 + ||D||^2))   (gate_up G, down D)
"""

from __future__ import annotations

import logging
import math

import torch

from moequant.arch import get_arch
from moequant.evals.drift import moe_modules

logger = logging.getLogger(__name__)

ABS_TOL, REL_TOL = 1e-3, 1e-2  # recorded values are rounded to 6 decimals; dtype round trips are ~1e-4


@torch.no_grad()
def decoded_weight_errors(original, quantized) -> dict[tuple[int, int], float]:
    """(layer, expert) -> relative weight error of the quantized model's decoded expert vs the original."""
    from moequant.modules.qexperts import QuantizedExperts

    arch = get_arch(original)
    ref, q = moe_modules(original, arch), moe_modules(quantized, arch)
    out = {}
    for layer, rb in ref.items():
        qe = q[layer].experts
        if not isinstance(qe, QuantizedExperts) or not hasattr(rb.experts, arch.in_proj):
            continue
        w = arch.expert_weights(rb.experts)
        for e in range(qe.num_experts):
            G, D = w.gate_up[e].float(), w.down[e].float()  # [2I, H] ([I, H] non-gated), [H, I]
            Gq = qe.slot(e).gate_up.dequantize(torch.float32).to(G.device)  # like G
            Dq = qe.slot(e).down.dequantize(torch.float32).to(D.device)  # [H, I]
            num = (G - Gq).pow(2).sum() + (D - Dq).pow(2).sum()
            den = (G.pow(2).sum() + D.pow(2).sum()).clamp(min=1e-30)
            out[(layer, e)] = float((num / den).sqrt())
    return out


def check(original, quantized, quant_report: dict) -> dict:
    """{"checked", "mismatches": [{layer, expert, recorded, decoded}], "ok"} against quant_report.json rows."""
    recorded = {
        (int(r["layer"]), int(r["expert"])): float(r["rel_weight_error"])
        for r in quant_report.get("experts", [])
        if r.get("rel_weight_error") is not None
    }
    if not recorded:
        return {
            "checked": 0,
            "mismatches": [],
            "ok": None,
            "note": "quant_report.json records no weight errors",
        }
    decoded = decoded_weight_errors(original, quantized)
    bad = []
    for key, rec in sorted(recorded.items()):
        dec = decoded.get(key)
        if dec is None:
            continue
        if not math.isfinite(dec) or abs(dec - rec) > ABS_TOL + REL_TOL * rec:
            bad.append({"layer": key[0], "expert": key[1], "recorded": rec, "decoded": round(dec, 6)})
    checked = len(set(recorded) & set(decoded))
    if bad:
        logger.warning(
            "checkpoint integrity: %d of %d experts decode to weights that differ from what quant_report.json "
            "recorded (e.g. layer %d expert %d: recorded error %.4f, decoded %.4f); the checkpoint is read "
            "differently than it was written, or --baseline is not the model it was quantized from",
            len(bad),
            checked,
            bad[0]["layer"],
            bad[0]["expert"],
            bad[0]["recorded"],
            bad[0]["decoded"],
        )
    return {"checked": checked, "mismatches": bad, "ok": not bad}
