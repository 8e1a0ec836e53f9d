"""CheckpointWriter's resume / overwrite rules (check_target): refuse touching nothing, resume only what exists."""

import logging

import pytest

from moequant.checkpoint.writer import CheckpointWriter, check_target
from moequant.errors import MoEQuantError


def test_resume_with_nothing_to_resume_starts_fresh(tmp_path, caplog):
    out = tmp_path / "q"
    with caplog.at_level(logging.WARNING, logger="moequant"):
        writer = CheckpointWriter(out, resume=True)
    assert writer.resuming is False and writer.partial == tmp_path / "q.partial" and writer.partial.is_dir()
    assert [r.getMessage() for r in caplog.records] == [
        f"no interrupted run in {tmp_path / 'q.partial'}: starting a fresh run"
    ]


def test_resume_keeps_the_partial_folder_and_overwrite_discards_it(tmp_path):
    out = tmp_path / "q"
    (tmp_path / "q.partial").mkdir()
    (tmp_path / "q.partial" / "model-layer-00000.safetensors").write_text("x")
    assert CheckpointWriter(out, resume=True).resuming is True
    assert (tmp_path / "q.partial" / "model-layer-00000.safetensors").exists()
    writer = CheckpointWriter(out, overwrite=True)
    assert writer.resuming is False and list(writer.partial.iterdir()) == []


@pytest.mark.parametrize(
    "make,kwargs,needle",
    [
        ("q", {}, "already exists; pass --overwrite"),
        ("q", {"resume": True}, "already exists; pass --overwrite"),
        ("q.partial", {}, "holds an interrupted run"),
    ],
)
def test_refusals_create_nothing(tmp_path, make, kwargs, needle):
    (tmp_path / make).mkdir()
    for check in (check_target, CheckpointWriter):
        with pytest.raises(MoEQuantError, match=needle):
            check(tmp_path / "q", **kwargs)
        assert [p.name for p in tmp_path.iterdir()] == [make]
    assert check_target(tmp_path / "q", overwrite=True) is False
