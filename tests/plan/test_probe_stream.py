"""The streamed layer probe: its experts stand-in against the real experts module (outputs and gradients), and
its KL estimate against the exact second-order KL computed on the whole model."""

import pytest
import torch

from moequant.arch import decoder_layers
from moequant.arch.tiny import save_tiny, tiny_model
from moequant.checkpoint.source import open_source
from moequant.plan.probe import rtn_swapped
from moequant.plan.probe_experts import Rounding
from moequant.plan.probe_stream import StreamProbeConfig, streamed_kl


def streamed_kl_increase(source, ids: torch.Tensor, cfg: StreamProbeConfig) -> dict[int, float]:
    """{MoE layer: estimated KL per predicted token with that layer's experts at cfg.rounding} (see
    moequant/plan/probe_stream.py) on the sequences `ids` [N, L]."""
    return {i: v[0] for i, v in streamed_kl(source, ids, cfg, [cfg.rounding]).items()}


def _exact_second_order_kl(model, ids, layer_idx, bits, gs, eps=1e-3):
    """1/2 sum_t (J_t d)^T F_t (J_t d) per predicted token, J d by a central difference on layer layer_idx's
    output (routing fixed for so small a step), F_t = diag(p_t) - p_t p_t^T."""
    source = open_source(model)
    arch, blocks = source.arch, source.blocks
    ref = next(b for b in blocks if b.layer_idx == layer_idx)
    layer = decoder_layers(model, arch)[layer_idx]
    seen = {}

    def keep(module, args, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        h = layer.register_forward_hook(keep)
        logits = model(input_ids=ids).logits.double()  # [N, L, V]
        clean = seen["out"].clone()
        with rtn_swapped(arch, ref.experts, list(range(ref.num_experts)), bits, gs, False):
            model(input_ids=ids)
        delta = seen["out"] - clean  # [N, L, H]
        h.remove()

        def shifted(step):
            def add(module, args, out):
                return ((out[0] + step * delta), *out[1:]) if isinstance(out, tuple) else out + step * delta

            hook = layer.register_forward_hook(add)
            try:
                return model(input_ids=ids).logits.double()
            finally:
                hook.remove()

        jd = (shifted(eps) - shifted(-eps)) / (2 * eps)  # [N, L, V]
    p = torch.softmax(logits, -1)[:, :-1]
    jd = jd[:, :-1]
    quad = (p * jd**2).sum(-1) - (p * jd).sum(-1) ** 2  # [N, L-1]
    return 0.5 * float(quad.mean())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_streamed_kl_matches_the_exact_second_order_kl(tmp_path, model_type):
    """With many label draws the streamed estimate (forward stream, backward stream, experts read from disk a
    chunk at a time) agrees with the exact second-order KL of each layer's rounding within its Monte Carlo
    noise (8 sequences x 48 draws: about 7% relative standard deviation)."""
    save_tiny(model_type, tmp_path, seed=3)
    model = tiny_model(model_type, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (8, 20), generator=torch.Generator().manual_seed(0))
    cfg = StreamProbeConfig(Rounding(3, 32, False), batch_size=3, draws=48, progress=False)
    est = streamed_kl_increase(open_source(str(tmp_path), lazy_experts=True), ids, cfg)
    assert sorted(est) == [b.layer_idx for b in open_source(model).blocks]
    for i, v in est.items():
        exact = _exact_second_order_kl(model, ids, i, 3, 32)
        assert exact > 0 and v == pytest.approx(exact, rel=0.2), (i, v, exact)
    again = streamed_kl_increase(open_source(str(tmp_path), lazy_experts=True), ids, cfg)
    assert again == est  # seeded draws: the same plan on every run
