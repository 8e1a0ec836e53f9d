"""What a quantize run reports (moequant/quantize/summary.py)."""

from __future__ import annotations

from pathlib import Path

from moequant.quantize.summary import QuantizeSummary


def _summary(**kw) -> QuantizeSummary:
    base = dict(out=Path("q"), seconds=12.0, bytes_before=4_000_000, bytes_after=1_500_000,
                expert_bytes_before=3_000_000, expert_bytes_after=500_000, average_bits=2.754,
                histogram={"gptq:2": 10, "gptq:3": 22}, fallbacks=0)  # fmt: skip
    return QuantizeSummary(**(base | kw))


def test_table_states_sizes_widths_and_time_split_by_pass():
    lines = _summary(passes={"profile": 3.0, "quantize": 7.5}).table().splitlines()
    assert lines[1].split() == ["model", "size", "4.00", "MB", "1.50", "MB"]
    assert lines[3].split()[-2:] == ["16.00", "2.754"] and lines[3].startswith("bits / expert weight")
    assert lines[4] == "experts per width: gptq:2 x10, gptq:3 x22"
    assert lines[-1] == "time: 12.0 s (profile 3.0 s, quantize 7.5 s, other 1.5 s) -> q"


def test_table_names_fallbacks_and_planned_linears_only_when_there_are_some():
    plain = _summary().table()
    assert "fell back" not in plain and "non-expert" not in plain and plain.endswith("time: 12.0 s -> q")
    table = _summary(fallbacks=3, linear_histogram={"gptq:4": 5}).table()
    assert "experts that fell back to RTN (too few routed tokens): 3" in table
    assert "non-expert Linears per width (planned with experts, counted in the bits): gptq:4 x5" in table
    assert "bits / planned weight" in table
