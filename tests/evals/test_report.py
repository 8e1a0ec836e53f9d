"""The report's number formatting, tables and lm-eval rows."""

import math

from moequant.evals.report import fmt, human_bytes, lm_eval_rows, md_table


def test_fmt():
    assert [fmt(None), fmt(math.nan), fmt(7), fmt("x")] == ["-", "-", "7", "x"]
    assert [fmt(123456.0), fmt(3.14159), fmt(0.0123456), fmt(0.5, 2)] == [
        "1.235e+05",
        "3.142",
        "0.0123",
        "0.50",
    ]


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 1234, 150e6, 2.5e9)] == ["999 B", "1.23 kB", "150 MB", "2.5 GB"]


def test_md_table():
    assert md_table(["a", "b"], [[1, 0.25], [None, "x"]]) == "| a | b |\n|---|---|\n| 1 | 0.2500 |\n| - | x |"


def test_lm_eval_rows_pair_the_scores_of_both_models():
    baseline = {"t": {"acc": {"value": 0.5, "stderr": 0.1}, "sample_len": {"value": 20}}}
    quantized = {
        "t": {"acc": {"value": 0.4, "stderr": 0.1}, "sample_len": {"value": 20}},
        "u": {"bits_per_byte": {"value": 1.2, "stderr": None}},
    }
    rows = lm_eval_rows(baseline, quantized)
    assert [(r["task"], r["metric"]) for r in rows] == [("t", "acc"), ("u", "bits_per_byte")]
    t, u = rows
    assert (t["baseline"], t["quantized"], t["samples"], t["lower_is_better"]) == (0.5, 0.4, 20, False)
    assert math.isclose(t["delta"], -0.1) and math.isclose(t["rel_delta"], -0.2)
    assert (u["baseline"], u["delta"], u["rel_delta"], u["samples"], u["lower_is_better"]) == (
        None,
        None,
        None,
        0,
        True,
    )
