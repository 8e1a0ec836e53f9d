"""`moequant sweep`: a 2-point sweep of the bundled model with --limit, the point list, the Pareto front."""

import csv
import json

import pytest

import moequant  # noqa: F401
from moequant.cli.main import main
from moequant.evals.plots import pareto_front
from moequant.evals.sweep import SweepConfig, SweepMethod, parse_bits, plan_points


def small_calib_file(folder) -> str:
    """~60 kB of the corpus's train split: tokenizing the whole corpus costs more than this sweep's quantization."""
    from moequant.calibration.corpus import load_split

    path = folder / "calib.txt"
    path.write_text("\n\n".join(text[:10_000] for text in load_split("train").values()))
    return str(path)


def test_points_and_skips_are_explicit():
    cfg = SweepConfig(
        bits=parse_bits("2.5,3,3.5,4"), methods=SweepMethod.parse_list("planned,uniform,rtn,bnb-nf4")
    )
    points, skipped = plan_points(cfg)
    labels = [p.label for p in points]
    assert labels == [
        "planned-2.5b",
        "planned-3b",
        "planned-3.5b",
        "planned-4b",
        "uniform-3b",
        "uniform-4b",
        "rtn-3b",
        "rtn-4b",
        "bnb-nf4",
    ]
    assert skipped == [
        "uniform 2.5 bits: uniform widths are 2, 3, 4, 8",
        "uniform 3.5 bits: uniform widths are 2, 3, 4, 8",
        "rtn 2.5 bits: uniform widths are 2, 3, 4, 8",
        "rtn 3.5 bits: uniform widths are 2, 3, 4, 8",
    ]


def test_bad_arguments(capsys):
    assert main(["sweep", "--methods", "planned,magic"]) == 2
    assert "unknown sweep method 'magic'" in capsys.readouterr().err
    assert main(["sweep", "--bits", "3,x"]) == 2
    assert "--bits takes numbers" in capsys.readouterr().err


def test_pareto_front():
    pts = [
        {"label": "a", "size_gb": 1.0, "ppl": 10.0},
        {"label": "b", "size_gb": 2.0, "ppl": 12.0},  # bigger and worse than a
        {"label": "c", "size_gb": 3.0, "ppl": 9.0},
        {"label": "d", "size_gb": 0.5, "ppl": 20.0},
    ]
    assert [p["label"] for p in pareto_front(pts)] == ["d", "a", "c"]


@pytest.mark.slow
def test_two_point_sweep_of_the_bundled_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = "sweep --bits 3 --methods planned,rtn --limit 1 --samples 4 --seq-len 64 --keep --no-original"
    calib = small_calib_file(tmp_path)
    assert main([*args.split(), "--calib", calib, "--out", str(out), "--name", "s", "--quiet"]) == 0
    assert "planned-3b" in capsys.readouterr().out
    for f in ("s.json", "s.csv", "s.md", "s_pareto.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "s.json").read_text())
    pts = {p["label"]: p for p in res["points"]}
    assert list(pts) == ["planned-3b", "rtn-3b"]
    assert pts["planned-3b"]["average_bits"] == pytest.approx(3.0, abs=0.01)
    assert 3.0 < pts["rtn-3b"]["average_bits"] < 3.3  # 3-bit codes + scale/zero overhead
    for p in res["points"]:
        assert (
            p["ppl"] > 1 and p["tokens_per_s"] > 0 and p["throughput_path"] == "cpu, moequant reference path"
        )
        assert 0 <= p["scores"]["moequant_cont:acc"]["value"] <= 1
        assert 0.002 < p["size_gb"] < 0.004  # the bundled model is 7.76 MB in bf16
    with open(out / "s.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == list(pts)
    assert float(rows[0]["size_gb"]) == pts["planned-3b"]["size_gb"]
    md = (out / "s.md").read_text()
    assert "command: `moequant sweep --bits 3 --methods planned,rtn" in md and "machine:" in md
    assert "Pareto front" in md and "s_pareto.png" in md
    kept = out / "s_points" / "planned-3b"  # --keep: the point's checkpoint, its card with the sweep table
    assert (kept / "config.json").is_file() and "budget sweep" in (kept / "README.md").read_text()
