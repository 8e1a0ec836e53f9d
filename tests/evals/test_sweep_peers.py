"""`moequant sweep --peers`: recorded peer rows in the table and on the Pareto plot, input validated."""

import json
import logging

import pytest

from moequant.cli.main import main
from moequant.errors import MoEQuantError
from moequant.evals import plots
from moequant.evals.sweep import PEERS_FORMAT, load_peers, write_sweep


def _row(tool, bits, size, ppl, model="bundled", status="ok", variant="experts"):
    return {
        "model": model, "tool": tool, "method": tool, "label": tool, "version": "1.0", "variant": variant,
        "bits": bits, "bits_per_weight": bits + 0.25, "size_bytes": size, "size_kind": "checkpoint on disk",
        "ppl": {"english": ppl - 1, "code": ppl + 1, "overall": ppl}, "wall_s": 12.5, "status": status,
    }  # fmt: skip


def write_peers(folder, rows, **extra) -> str:
    path = folder / "bench_peers.json"
    doc = {"format": PEERS_FORMAT, "meta": {"date": "2026-12-07T05:00:00+00:00"}, "model": "bundled"}
    path.write_text(json.dumps(doc | {"seq_len": 256, "rows": rows} | extra))
    return str(path)


ROWS = [
    _row("auto-round", 3, 2_400_000, 62.5),
    _row("hqq", 4, 2_900_000, 62.1, variant="all-linear"),
    _row("hqq", 2, 2_000_000, 70.0, status="failed: check: 5 distinct values"),
    _row("gptqmodel", 4, 2_700_000, 61.9, model="mistralai/Mixtral-8x7B-v0.1"),
]


def test_ok_rows_of_the_model_become_recorded_points(tmp_path, caplog):
    path = write_peers(tmp_path, ROWS)
    with caplog.at_level(logging.INFO, logger="moequant.evals.sweep"):
        pts = load_peers([path], None)  # None: the bundled model
    assert [p["label"] for p in pts] == ["auto-round W3 experts", "hqq W4 all-linear"]
    a = pts[0]
    assert a["method"] == "auto-round 1.0" and a["tool"] == "auto-round" and a["recorded"] is True
    assert a["size_gb"] == 2.4e-3 and a["ppl"] == 62.5 and a["average_bits"] == 3.25
    assert a["ppl_by_domain"] == {"english": 61.5, "code": 63.5}
    assert a["source"] == "bench_peers.json" and a["date"] == "2026-12-07"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 row(s) of model mistralai/Mixtral-8x7B-v0.1" in warned[0].getMessage()
    assert any("1 failed row(s)" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert load_peers([path], "tiny-moe") == pts  # an alias of the bundled model matches too
    assert [p["label"] for p in load_peers([path], "mistralai/Mixtral-8x7B-v0.1")] == ["gptqmodel W4 experts"]


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        json.dumps([1, 2]),
        json.dumps({"model": "bundled", "points": []}),  # a sweep's JSON
        json.dumps({"format": PEERS_FORMAT, "rows": [{"tool": "hqq"}]}),  # rows without their fields
        json.dumps({"format": "something/else", "rows": [_row("hqq", 4, 1, 2.0)]}),
    ],
)
def test_a_file_that_is_not_a_peers_json_is_one_clear_error(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(MoEQuantError, match="--peers .*x.json"):
        load_peers([str(path)], None)
    with pytest.raises(MoEQuantError, match="cannot read"):
        load_peers([str(tmp_path / "missing.json")], None)


SWEEP = {
    "model": "bundled", "command": "moequant sweep", "moequant": "0.1.0", "date": "2026-12-07", "machine": "cpu",
    "device": "cpu", "seconds": 1.0, "load_average": [1.0, 1.0], "skipped": [],
    "config": {"bits": [3.0], "methods": ["uniform"], "tasks": [], "limit": 2, "calibration": "bundled",
               "group_size": 128, "seq_len": 256, "quantize": {}},
    "points": [
        {"label": "original", "method": "original", "target_bits": 16.0, "average_bits": 16.0,
         "size_gb": 7.76e-3, "ppl": 61.7, "quantize_s": None},
        {"label": "uniform-3b", "method": "uniform", "target_bits": 3.0, "average_bits": 3.19,
         "size_gb": 2.7e-3, "ppl": 62.2, "quantize_s": 9.0},
    ],
}  # fmt: skip


def test_sweep_table_and_plot_get_the_peer_points(tmp_path, monkeypatch):
    peers = load_peers([write_peers(tmp_path, ROWS)], None)
    seen = {}
    real = plots.pareto

    def spy(points, path, *a, peers=(), **k):
        seen["points"], seen["peers"] = points, peers
        return real(points, path, *a, peers=peers, **k)

    monkeypatch.setattr(plots, "pareto", spy)
    write_sweep(SWEEP | {"peers": peers}, tmp_path, "s")
    assert [p["label"] for p in seen["points"]] == ["original", "uniform-3b"]  # the sweep's own points
    assert seen["peers"] == peers
    assert (tmp_path / "s_pareto.png").stat().st_size > 0
    md = (tmp_path / "s.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[-2:] == [
        "| auto-round W3 experts | auto-round 1.0 (recorded: bench_peers.json, 2026-12-07) | 3.250 | 2.4 | 62.5 | - |",
        "| hqq W4 all-linear | hqq 1.0 (recorded: bench_peers.json, 2026-12-07) | 4.250 | 2.9 | 62.1 | - |",
    ]
    assert "Recorded peer points (not re-run" in md and "this sweep's at most 2 per domain" in md
    assert (
        "Pareto front of the quantized points (none is both smaller and better), by size: uniform-3b." in md
    )
    csv_rows = (tmp_path / "s.csv").read_text().splitlines()
    assert len(csv_rows) == 3  # the CSV holds the sweep's own measurements only


def test_the_plot_draws_each_tool_as_its_own_recorded_series(tmp_path):
    peers = load_peers([write_peers(tmp_path, ROWS)], None)
    fig_axes = {}
    real_save = plots._save

    def keep(fig, path):
        fig_axes["axes"] = fig.axes
        return real_save(fig, path)

    try:
        plots._save = keep
        plots.pareto(SWEEP["points"], tmp_path / "p.png", peers=peers)
    finally:
        plots._save = real_save
    labels = fig_axes["axes"][0].get_legend_handles_labels()[1]
    assert "auto-round 1.0 (recorded)" in labels and "hqq 1.0 (recorded)" in labels
    assert "uniform" in labels
    better = load_peers([write_peers(tmp_path, [_row("auto-round", 3, 2_400_000, 58.0)])], None)
    try:
        plots._save = keep
        plots.pareto(SWEEP["points"][1:], tmp_path / "p.png", peers=better)  # no original; a peer is the best
    finally:
        plots._save = real_save
    low, high = fig_axes["axes"][1].get_ylim()  # the zoom: within 3% of the best point, peers included
    assert low <= 58.0 and high < 62.2


def test_cli_refuses_a_bad_peers_file_before_any_slow_pass(tmp_path, capsys, monkeypatch):
    import moequant.evals.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    bad = tmp_path / "sweep.json"
    bad.write_text(json.dumps({"points": []}))
    assert main(["sweep", "--peers", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a peers benchmark JSON" in capsys.readouterr().err


def test_cli_hands_the_peers_to_the_sweep(tmp_path, capsys, monkeypatch):
    import moequant.evals.sweep as sweep

    got = {}

    def fake_run(model, config, out, name, command=None, peers=None):
        got["peers"], got["command"] = peers, command
        return {"points": SWEEP["points"], "peers": peers}

    monkeypatch.setattr(sweep, "run_sweep", fake_run)
    path = write_peers(tmp_path, ROWS)
    assert main(["sweep", "--peers", path, path, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert [p["label"] for p in got["peers"]] == ["auto-round W3 experts", "hqq W4 all-linear"] * 2
    assert got["command"].endswith(f"--out {tmp_path / 'o'} --peers {path} {path}")
    assert "(recorded: bench_peers.json, 2026-12-07)" in capsys.readouterr().out
