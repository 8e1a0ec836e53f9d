"""Tiny random models and the byte tokenizer the tests build them with."""

import torch

from moequant.arch import moe_blocks
from moequant.arch.tiny import byte_tokenizer, tiny_config, tiny_model


def test_byte_tokenizer_has_one_token_per_byte():
    tok = byte_tokenizer()
    assert len(tok) == 256
    text = "naïve ∑ 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) == 15  # 6 + 1 + 3 + 1 + 4 bytes
    assert tok.decode(ids) == text


def test_tiny_config_overrides_the_shrunk_defaults():
    config = tiny_config("mixtral", num_hidden_layers=3)
    assert (config.num_hidden_layers, config.hidden_size, config.num_local_experts) == (3, 64, 8)


def test_tiny_model_is_seeded_and_its_routers_get_the_seeds_draws():
    a, b, c = tiny_model("mixtral", seed=3), tiny_model("mixtral", seed=3), tiny_model("mixtral", seed=4)
    assert not a.training
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    router = moe_blocks(a)[0].router.weight  # the first draws of the seed's generator, at scale 0.5
    assert torch.equal(router, torch.randn(router.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
