"""The sensitivity probe: which experts and layers are probed."""

from moequant.evals.sensitivity import ProbeConfig, choose_probes


def test_probe_choice_is_bounded():
    tokens = {(l, e): 10 * l + e for l in range(4) for e in range(8)}
    probes = choose_probes(tokens, ProbeConfig(experts_per_end=2, layers=2, max_probes=6))
    assert len(probes) == 6
    assert [p.reason for p in probes[:3]] == ["most-routed", "least-routed", "layer"]
    assert probes[0].experts == [7] and probes[0].layer == 3 and probes[1].tokens == 0
    assert {p.layer for p in probes if p.kind == "layer"} == {0, 3}
    assert len(choose_probes(tokens, ProbeConfig(max_probes=2))) == 2
