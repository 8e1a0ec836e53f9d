"""Sweep points as CSV and markdown."""

import csv

from moequant.evals.sweep_table import BASE_COLUMNS, score_columns, sweep_md, write_csv

POINTS = [
    {
        "label": "planned-3b", "method": "planned", "target_bits": 3.0, "average_bits": 2.9987, "size_gb": 0.0123,
        "ppl": 12.5, "tokens_per_s": 151.4, "quantize_s": 9.0,
        "scores": {"cont:acc": {"value": 0.5, "stderr": 0.05}},
    },
    {
        "label": "bnb-nf4", "method": "bnb-nf4", "target_bits": None, "average_bits": 4.5, "size_gb": 0.02,
        "ppl": None, "tokens_per_s": None, "quantize_s": 1.0,
        "scores": {"ppl:bits_per_byte": {"value": 1.25, "stderr": None}},
    },
]  # fmt: skip


def test_score_columns_in_first_seen_order():
    assert score_columns(POINTS) == ["cont:acc", "ppl:bits_per_byte"]
    assert score_columns([{"label": "x"}]) == []


def test_csv_has_a_column_per_field_score_and_stderr(tmp_path):
    path = write_csv(POINTS, tmp_path / "s.csv")
    with open(path) as fh:
        rows = list(csv.reader(fh))
    cols = ["cont:acc", "ppl:bits_per_byte"]
    assert rows[0] == [*BASE_COLUMNS, *cols, *(f"{c}_stderr" for c in cols)]
    assert rows[1] == [
        "planned-3b",
        "planned",
        "3.0",
        "2.9987",
        "0.0123",
        "12.5",
        "151.4",
        "9.0",
        "0.5",
        "",
        "0.05",
        "",
    ]
    assert rows[2] == ["bnb-nf4", "bnb-nf4", "", "4.5", "0.02", "", "", "1.0", "", "1.25", "", ""]


def test_markdown_table_in_megabytes_below_a_gigabyte():
    assert sweep_md(POINTS).splitlines() == [
        "| point | method | bits / expert weight | size (MB) | perplexity ↓ | cont:acc | ppl:bits_per_byte | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
        "| planned-3b | planned | 2.999 | 12.3 | 12.5 | 0.5000 ± 0.05 | - | 151 |",
        "| bnb-nf4 | bnb-nf4 | 4.500 | 20 | - | - | 1.25 | - |",
    ]
