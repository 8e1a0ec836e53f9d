"""What `evaluate` reads before it loads a model: the quantized folder, the baseline it is compared with."""

import json
from pathlib import Path

import pytest

from moequant.errors import MoEQuantError
from moequant.evals.evaluate import EvalConfig, read_moequant_folder, resolve_baseline


def _folder(path: Path, quantization_config: dict | None, report: dict | None = None) -> Path:
    path.mkdir()
    config = {"model_type": "mixtral"} | (
        {} if quantization_config is None else {"quantization_config": quantization_config}
    )
    (path / "config.json").write_text(json.dumps(config))
    if report is not None:
        (path / "quant_report.json").write_text(json.dumps(report))
    return path


def test_only_a_complete_moequant_folder_is_read(tmp_path):
    complete = {"quant_method": "moequant", "status": "complete"}
    config, report = read_moequant_folder(_folder(tmp_path / "q", complete, {"model": "org/m"}))
    assert config["quantization_config"] == complete and report == {"model": "org/m"}
    assert read_moequant_folder(_folder(tmp_path / "no-report", complete))[1] == {}
    with pytest.raises(MoEQuantError, match="not a model folder"):
        read_moequant_folder(tmp_path / "missing")
    with pytest.raises(MoEQuantError, match="not a moequant checkpoint"):
        read_moequant_folder(_folder(tmp_path / "plain", None))
    with pytest.raises(MoEQuantError, match="incomplete moequant checkpoint \\(status 'incomplete'\\)"):
        read_moequant_folder(
            _folder(tmp_path / "partial", {"quant_method": "moequant", "status": "incomplete"})
        )


def test_the_baseline_is_the_argument_else_the_reports_model(tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    q = tmp_path / "q"
    assert resolve_baseline(q, None, {"model": str(original)}) == str(original)
    assert resolve_baseline(q, str(original), {"model": "bundled"}) == str(original)  # the argument wins
    assert resolve_baseline(q, None, {"model": "bundled"}) is None  # the bundled model
    assert resolve_baseline(q, "tiny-moe", {}) is None
    with pytest.raises(MoEQuantError, match="does not name the original model; pass --baseline"):
        resolve_baseline(q, None, {})
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MoEQuantError, match="not a local model folder or Hub id"):
        resolve_baseline(q, str(tmp_path / "a-file"), {})


def test_limit_must_be_positive():
    assert EvalConfig(limit=1).limit == 1
    with pytest.raises(MoEQuantError, match="--limit must be at least 1, got 0"):
        EvalConfig(limit=0)
