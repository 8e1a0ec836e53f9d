"""`moequant families`: one line per family, the adapter derived or why there is none, and the count."""

from helpers import noise_router

from moequant.arch import get_arch
from moequant.arch.lookup import forget_adapters
from moequant.cli.main import main


def test_each_family_gets_its_adapter_or_the_reason(capsys, monkeypatch):
    """Every MoE family of this transformers derives an adapter: one whose router gives no logits
    (helpers.noise_router, on Mixtral) stands in for a family that does not."""
    arch = get_arch("qwen3_moe")
    qwen3 = (
        f"qwen3_moe  derived       {arch.layers}.N.{arch.experts_path} (router {arch.router_path}); "
        f"{arch.layout.value}, {arch.activation.value}; {arch.router_facts.describe()}"
    )
    noise_router(monkeypatch)
    try:
        assert main(["families", "mixtral", "qwen3_moe", "--quiet"]) == 0
    finally:
        forget_adapters()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("mixtral    unsupported   ") and "router logits" in lines[0]
    assert lines[1] == qwen3
    assert lines[2] == "1 of 2 families have an adapter (moequant families --check runs each end to end)"
