"""What a recorded result states beside its numbers: weight bytes, the machine, the code version."""

import os
import re

import torch

from moequant.evals.env_info import checkpoint_bytes, cpu_model, machine, source_fingerprint, today


def test_checkpoint_bytes_count_the_weight_files_only(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 23)
    (tmp_path / "moments.safetensors").write_bytes(b"x" * 1000)  # a profile's moments, not weights
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_bytes(tmp_path) == 123


def test_machine_line():
    line = machine()
    assert line.startswith(cpu_model() + ", ")
    assert f", {len(os.sched_getaffinity(0))} cores" in line and line.endswith(f", torch {torch.__version__}")
    assert ("no GPU" in line) == (not torch.cuda.is_available())


def test_source_fingerprint_and_date():
    code = source_fingerprint()
    assert set(code) == {"git_head", "uncommitted_library_files", "source_sha256"}
    assert re.fullmatch(r"[0-9a-f]{12}", code["source_sha256"]) and code["uncommitted_library_files"] >= 0
    assert code == source_fingerprint()  # the same tree, the same fingerprint
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d \S+", today())
