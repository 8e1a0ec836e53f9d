"""`moequant sweep`: a 2-point sweep of the bundled model with --limit, the point list, the Pareto front."""

import csv
import json

import pytest
from helpers import corpus_test_ids, reference_cont, reference_ppl

import moequant  # noqa: F401
from moequant.calibration.corpus import DOMAINS, load_split
from moequant.cli.main import main
from moequant.evals.sweep import SweepConfig, SweepMethod, parse_bits, plan_points


def small_calib_file(folder) -> str:
    """~60 kB of the corpus's train split: tokenizing the whole corpus costs more than this sweep's quantization."""

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


@pytest.mark.slow
def test_two_point_sweep_of_the_bundled_model(tmp_path, monkeypatch, capsys):
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.plan.schema import Plan

    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    calib_args = ["--calib", small_calib_file(tmp_path), "--samples", "4", "--seq-len", "64"]
    args = "sweep --bits 3 --methods planned,rtn --limit 1 --keep --no-original".split()
    assert main([*args, *calib_args, "--out", str(out), "--name", "s", "--quiet"]) == 0
    assert "planned-3b" in capsys.readouterr().out
    for f in ("s.json", "s.csv", "s.md", "s_pareto.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "s.json").read_text())
    pts = {p["label"]: p for p in res["points"]}
    assert list(pts) == ["planned-3b", "rtn-3b"]
    assert pts["planned-3b"]["average_bits"] <= 3.0  # within the budget
    assert pts["planned-3b"]["average_bits"] == pytest.approx(3.0, abs=0.01)
    assert 3.0 < pts["rtn-3b"]["average_bits"] < 3.3  # 3-bit codes + scale/zero overhead
    # the planned point is the plan `moequant quantize --bits 3` makes from the same calibration
    q3 = tmp_path / "q3"
    assert (
        main(
            ["quantize", "--bits", "3", *calib_args, "--allow-thin-calibration", "--out", str(q3), "--quiet"]
        )
        == 0
    )
    capsys.readouterr()
    kept = out / "s_points"
    cli_plan = json.loads((q3 / "plan.json").read_text())
    assert json.loads((kept / "planned-3b" / "plan.json").read_text())["layers"] == cli_plan["layers"]
    assert pts["planned-3b"]["average_bits"] == pytest.approx(Plan.load(q3 / "plan.json").average_bits())
    # every point measured on its own checkpoint (--keep): size, perplexity and lm-eval recomputed here
    tok = load_tokenizer(None)
    for label, p in pts.items():
        folder = kept / label
        weights = sorted(folder.glob("*.safetensors"))
        assert weights and p["size_gb"] == sum(f.stat().st_size for f in weights) / 1e9, label
        model = load_model(str(folder))
        ppl = reference_ppl(
            model, corpus_test_ids(tok), seq_len=256, windows=1
        )  # --limit 1 window of 256 tokens per domain
        assert p["ppl"] == pytest.approx(ppl["overall"], rel=1e-5), label
        assert p["ppl_by_domain"] == pytest.approx({d: ppl[d] for d in DOMAINS}, rel=1e-5), label
        cont = reference_cont(model, tok, limit=1)
        assert p["scores"]["moequant_cont:acc"]["value"] == cont["acc"], label
        assert p["scores"]["moequant_cont:acc_norm"]["value"] == cont["acc_norm"], label
        assert p["throughput_path"] == "cpu, moequant reference path"  # tokens/s: test_throughput.py
    with open(out / "s.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == list(pts)
    assert float(rows[0]["size_gb"]) == pts["planned-3b"]["size_gb"]
    md = (out / "s.md").read_text()
    assert "command: `moequant sweep --bits 3 --methods planned,rtn" in md and "machine:" in md
    assert "Pareto front" in md and "s_pareto.png" in md
    point = kept / "planned-3b"  # --keep: the point's checkpoint, its card with the sweep table
    assert (point / "config.json").is_file() and "budget sweep" in (point / "README.md").read_text()
