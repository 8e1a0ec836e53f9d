"""`moequant families`: one line per family, the adapter derived or why there is none, and the count."""

from moequant.arch import get_arch
from moequant.cli.main import main


def test_each_family_gets_its_adapter_or_the_reason(capsys):
    assert main(["families", "mixtral", "zaya", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    arch = get_arch("mixtral")
    mixtral = (
        f"mixtral  derived       {arch.layers}.N.{arch.experts_path} (router {arch.router_path}); "
        f"{arch.layout.value}, {arch.activation.value}; {arch.router_facts.describe()}"
    )
    assert lines[0] == mixtral
    assert lines[1].startswith("zaya     unsupported   ") and "router logits" in lines[1]
    assert lines[2] == "1 of 2 families have an adapter (moequant families --check runs each end to end)"
