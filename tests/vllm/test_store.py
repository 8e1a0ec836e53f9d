"""ExpertStore: each checkpoint tensor into its own expert's storage at that expert's width, or a refusal."""

import pytest
import torch

from moequant.checkpoint.format import MoEQuantConfig, empty_experts_module
from moequant.errors import CheckpointError
from moequant.vllm.store import ExpertStore, stores_of

SPECS = ["rtn:2", "rtn:4/rtn:3", "keep"]


def _store() -> ExpertStore:
    cfg = MoEQuantConfig(group_size=32, hidden=64, intermediate=32, experts={"0": SPECS})
    return ExpertStore(5, empty_experts_module(cfg, cfg.specs()[0], device="cpu"))


def _filled(store: ExpertStore, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = {}
    for key, t in store.experts.state_dict().items():
        if t.dtype.is_floating_point:
            v = torch.rand(t.shape, generator=g).to(t.dtype)
        else:
            v = torch.randint(0, 3, t.shape, generator=g).to(t.dtype)
        values[key] = v
        e, proj, name = key.split(".", 2)
        store.load(int(e), proj, name, v)
    return values


def test_tensor_names_cover_every_width():
    store = _store()
    assert store.tensor_names("gate_up") == ["dense", "qweight", "qzeros", "scales"]
    assert store.tensor_names("down") == ["dense", "qweight", "qzeros", "scales"]
    with pytest.raises(ValueError):
        store.tensor_names("w13")


def test_load_puts_each_tensor_in_its_expert_and_completes():
    store = _store()
    values = _filled(store)
    assert store.missing() == []
    store.check_complete()
    for key, t in store.experts.state_dict().items():
        assert torch.equal(t, values[key])
    assert stores_of(torch.nn.Sequential(store)) == {5: store}


def test_another_width_or_expert_is_refused():
    store = _store()
    two_bit = store.experts.slot(0).gate_up.qweight
    four_bit = store.experts.slot(1).gate_up.qweight
    assert two_bit.shape != four_bit.shape
    with pytest.raises(CheckpointError, match="expert 1 .*rtn:4 expects"):
        store.load(1, "gate_up", "qweight", torch.zeros_like(two_bit))  # expert 0's 2-bit tensor
    with pytest.raises(CheckpointError, match="stored as keep, which has no tensor 'qweight'"):
        store.load(2, "down", "qweight", torch.zeros_like(four_bit))
    with pytest.raises(CheckpointError, match="has 3 experts"):
        store.load(3, "down", "dense", torch.zeros(64, 32))
    store.load(0, "gate_up", "qweight", torch.zeros_like(two_bit))
    with pytest.raises(CheckpointError, match="arrived twice"):
        store.load(0, "gate_up", "qweight", torch.zeros_like(two_bit))
    with pytest.raises(CheckpointError, match="filled no 0.down.qweight"):
        store.check_complete()


def test_forward_is_the_routed_sum_of_quantized_experts():
    store = _store()
    _filled(store)
    x = torch.randn(6, 64)  # [T, H]
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]], dtype=torch.int32)  # [T, 2]
    w = torch.rand(6, 2)  # [T, 2]
    torch.testing.assert_close(store(x, ids, w), store.experts(x, ids.long(), w))
