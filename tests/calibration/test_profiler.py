"""Routing profiler invariants on tiny random models of every family, and the `profile` command."""

import pytest
import torch
from helpers import random_calib

from moequant.arch.tiny import save_tiny, tiny_model
from moequant.calibration.profiler import ProfileConfig, profile_pass
from moequant.checkpoint.source import open_source

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
QUIET = ProfileConfig(batch_size=2, progress=False)


def _profile(model, data, config=QUIET):
    return profile_pass(open_source(model), data, config)


def _data(n=6, seq=24, vocab=256, seed=0):
    return random_calib(n, seq, seed, vocab, sources=("b", "a"))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_counts_sum_to_tokens_times_top_k(model_type):
    model = tiny_model(model_type)
    data = _data()
    prof = _profile(model, data, QUIET)
    assert prof.tokens == data.tokens
    for s in prof.layers.values():
        assert s.tokens == data.tokens
        assert int(s.counts.sum()) == data.tokens * s.top_k
        assert torch.equal(torch.diagonal(s.coact), (s.counts > 0).long() * s.counts)  # no duplicate ids
        assert sum(int(v.sum()) for v in s.by_source.values()) == data.tokens * s.top_k
        assert (s.moments_in() > 0).all()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_profile_of_batch_equals_merge_of_halves(model_type):
    model = tiny_model(model_type, seed=3)
    data = _data(n=8, seed=1)
    whole = _profile(model, data, QUIET)
    a, b = data.split(4)
    merged = _profile(model, a, QUIET).merge(_profile(model, b, QUIET))
    assert merged.tokens == whole.tokens
    for i, s in whole.layers.items():
        m = merged.layers[i]
        assert torch.equal(m.counts, s.counts)
        assert torch.equal(m.coact, s.coact)
        assert {k: v.tolist() for k, v in m.by_source.items()} == {
            k: v.tolist() for k, v in s.by_source.items()
        }
        for name in ("weight_mass", "sq_in", "sq_mid", "sq_all"):
            torch.testing.assert_close(getattr(m, name), getattr(s, name), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "olmoe"])
def test_streamed_profile_sees_the_plain_forwards_routing(model_type):
    """The layer-by-layer profile pass routes every token as one whole-model forward does, and changes nothing."""
    from moequant.arch import moe_blocks

    model = tiny_model(model_type, seed=4)
    data = _data(n=2)
    counts, handles = {}, []
    for ref in moe_blocks(model):

        def tap(module, args, out, i=ref.layer_idx, E=ref.num_experts):
            counts[i] = torch.bincount(out[2].reshape(-1), minlength=E)  # router -> (logits, weights, index)

        handles.append(ref.router.register_forward_hook(tap))
    with torch.no_grad():
        ref_logits = model(input_ids=data.input_ids).logits
    for h in handles:
        h.remove()
    prof = _profile(model, data, ProfileConfig(batch_size=2, progress=False))
    assert sorted(prof.layers) == sorted(counts)
    for i, s in prof.layers.items():
        assert torch.equal(s.counts, counts[i]), i
    with torch.no_grad():
        assert torch.equal(model(input_ids=data.input_ids).logits, ref_logits)  # no weight changed
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_lazy_profile_reads_experts_in_chunks_and_matches_the_loaded_one(tmp_path, model_type, monkeypatch):
    """A checkpoint source with lazy experts (the layer loads without them; the profile reads them a chunk of
    experts at a time and computes their outputs itself) records the statistics of the loaded-layer profile,
    and never reads more than a chunk of experts at once."""
    save_tiny(model_type, tmp_path, seed=2, dtype=torch.bfloat16)
    data = _data(n=6, seq=24)
    loaded = profile_pass(open_source(str(tmp_path)), data, ProfileConfig(batch_size=3, progress=False))
    source = open_source(str(tmp_path), lazy_experts=True)
    reads = []
    read = source.read_experts
    monkeypatch.setattr(
        source, "read_experts", lambda i, experts: reads.append(list(experts)) or read(i, experts)
    )
    hidden, inter = source.arch.expert_dims(source.blocks[0].experts)
    chunk_mb = 3.5 * 4 * 3 * hidden * inter / 2**20  # 3 experts a read (float32 gate, up, down)
    lazy = profile_pass(source, data, ProfileConfig(batch_size=3, progress=False, chunk_mb=chunk_mb))
    assert reads and max(len(r) for r in reads) < source.blocks[0].num_experts  # chunks, not whole layers
    assert sorted(lazy.layers) == sorted(loaded.layers)
    for i, a in loaded.layers.items():
        b = lazy.layers[i]
        assert torch.equal(a.counts, b.counts) and torch.equal(a.coact, b.coact), i  # same routing
        for name in ("weight_mass", "sq_all", "sq_in", "sq_mid"):
            torch.testing.assert_close(
                getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-6, msg=f"{i} {name}"
            )


def test_record_routing_leaves_out_slots_of_weight_zero():
    """A slot of routing weight 0 routes nowhere (a family's masked skip / zero expert): no count, co-activation,
    source count or input moment of the expert its index names."""
    from moequant.calibration.profiler import record_routing
    from moequant.calibration.stats import LayerStats

    s = LayerStats(4, 2, 3, 5)
    x = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])  # [T, H]
    idx = torch.tensor([[1, 0], [0, 2], [3, 0]])  # [T, k]
    w = torch.tensor([[0.7, 0.0], [0.4, 0.6], [1.0, 0.0]])  # slot 2 of tokens 0 and 2 masked to expert 0
    onehot = record_routing(s, x, idx, w, ["a"])
    assert s.counts.tolist() == [1, 1, 1, 1] and onehot.sum().item() == 4
    assert s.sq_in[0].tolist() == [0.0, 4.0, 0.0]  # token 1 alone
    assert s.coact[0].tolist() == [1, 0, 1, 0] and s.by_source["a"].tolist() == [1, 1, 1, 1]
    assert s.tokens == 3 and s.weight_mass.tolist() == pytest.approx([0.4, 0.7, 0.6, 1.0])


@pytest.mark.parametrize("lazy", [False, True])
def test_zero_expert_slots_are_not_counted(tmp_path, lazy):
    """LongCat-Flash routes a third of its slots to zero experts (identity outputs added outside the experts);
    the experts receive those slots as dummy expert ids of weight 0. The profile's counts per expert equal the
    real experts its router chose, loaded or read lazily (and sq_mid averages over exactly those tokens)."""
    from moequant.arch import get_arch, moe_blocks
    from moequant.checkpoint.loading import load_model

    save_tiny("longcat_flash", tmp_path, seed=0)
    data = _data(n=4, seq=32)
    prof = profile_pass(open_source(str(tmp_path), lazy_experts=lazy), data, QUIET)
    model = load_model(str(tmp_path), dtype=torch.float32)
    seen, handles = {}, []
    for ref in moe_blocks(model, get_arch(model)):

        def hook(_m, _a, out, i=ref.layer_idx):
            idx = out[2]  # [T, k] classes: experts 0..7, zero experts 8..11
            seen[i] = seen.get(i, 0) + torch.bincount(idx[idx < 8], minlength=8)
            seen[(i, "zero")] = seen.get((i, "zero"), 0) + int((idx >= 8).sum())

        handles.append(ref.router.register_forward_hook(hook))
    with torch.no_grad():
        for b in range(0, 4, QUIET.batch_size):
            model(input_ids=data.input_ids[b : b + QUIET.batch_size], use_cache=False)
    for h in handles:
        h.remove()
    assert sorted(prof.layers) == [0, 1]
    for i, s in prof.layers.items():
        assert seen[(i, "zero")] > 0.1 * data.tokens * s.top_k  # the case the test is about
        assert s.counts.tolist() == seen[i].tolist()
        assert int(s.counts.sum()) == data.tokens * s.top_k - seen[(i, "zero")]
