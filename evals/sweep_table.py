"""Sweep points as CSV and markdown (shared by the sweep command and the model card)."""

from __future__ import annotations

import csv
from pathlib import Path

from moequant.evals.report import fmt, md_table

BASE_COLUMNS = (
    "label",
    "method",
    "target_bits",
    "average_bits",
    "size_gb",
    "ppl",
    "tokens_per_s",
    "quantize_s",
)


def score_columns(points: list[dict]) -> list[str]:
    """`task:metric` columns present in any point, in first-seen order."""
    return list(dict.fromkeys(k for p in points for k in p.get("scores", {})))


def write_csv(points: list[dict], path: str | Path) -> Path:
    cols = score_columns(points)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*BASE_COLUMNS, *cols, *(f"{c}_stderr" for c in cols)])
        for p in points:
            s = p.get("scores", {})
            w.writerow(
                [p.get(c) for c in BASE_COLUMNS]
                + [s.get(c, {}).get("value") for c in cols]
                + [s.get(c, {}).get("stderr") for c in cols]
            )
    return Path(path)


def sweep_md(points: list[dict], peers: list[dict] | tuple = ()) -> str:
    """The sweep's table; `peers` (recorded peer points, evals/sweep.py load_peers) follow its own points, their
    method cell marked as recorded with the file and date they come from."""
    cols = score_columns(points)
    sizes = [p["size_gb"] for p in [*points, *peers]]
    unit, scale = ("GB", 1.0) if max(sizes, default=0) >= 1 else ("MB", 1e3)
    header = ["point", "method", "bits / expert weight", f"size ({unit})", "perplexity ↓", *cols, "tokens/s"]
    rows = []
    for p in points:
        s = p.get("scores", {})
        rows.append(
            [
                p["label"],
                p["method"],
                f"{p['average_bits']:.3f}",
                f"{p['size_gb'] * scale:.4g}",
                p.get("ppl"),
                *[
                    "-"
                    if c not in s
                    else fmt(s[c]["value"])
                    + ("" if s[c].get("stderr") is None else f" ± {fmt(s[c]['stderr'], 2)}")
                    for c in cols
                ],
                None if p.get("tokens_per_s") is None else f"{p['tokens_per_s']:.0f}",
            ]
        )
    for p in peers:
        rows.append(
            [
                p["label"],
                f"{p['method']} (recorded: {p['source']}, {p['date']})",
                f"{p['average_bits']:.3f}",
                f"{p['size_gb'] * scale:.4g}",
                p["ppl"],
                *["-" for _ in cols],
                None,
            ]
        )
    return md_table(header, rows)
