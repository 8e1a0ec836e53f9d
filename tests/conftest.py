"""Fixtures shared by the test modules.

The session fixtures below run one command once for the whole session and hand its output to every test that
only reads it (a test that writes copies it to its own tmp_path first)."""

from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread unless a test asks for more (on 2 shared cores, OpenMP spin-waits make 2-thread
    runs 20-50x slower); the caller's count is restored whatever a test does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_calib(tmp_path_factory) -> Path:
    """A ~60 kB .txt of the bundled corpus's train split (10,000 characters of each domain, ~21,000 tokens):
    `--calib` for commands whose test is about plumbing, bytes or messages. Each command given the bundled
    corpus tokenizes all of it first (about 3 s of CPU, per process: every torchrun rank pays it)."""
    from moequant.calibration.corpus import load_split

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(text[:10_000] for text in load_split("train").values()))
    return path


def _main(argv: list[str]) -> None:
    from moequant.cli.main import main

    assert main(argv) == 0, argv


@pytest.fixture(scope="session")
def bundled_uniform3(tmp_path_factory) -> Path:
    """`moequant quantize --uniform --bits 3 --samples 16 --seq-len 128 --quiet --out <dir>/q` of the bundled
    model (GPTQ, default options and corpus), run once in this process: the clean run the SIGKILL test's
    resumed output must equal, the default the device-path test compares its other backends with. Read only."""
    out = tmp_path_factory.mktemp("uniform3") / "q"
    _main([*"quantize --uniform --bits 3 --samples 16 --seq-len 128 --quiet --out".split(), str(out)])
    return out


@pytest.fixture(scope="session")
def bundled_profile(tmp_path_factory) -> Path:
    """`moequant profile --samples 8 --seq-len 64 --quiet --out <dir>` of the bundled model (default corpus),
    run once in this process, for the tests of `moequant plan --profile`. Read only."""
    out = tmp_path_factory.mktemp("profile") / "prof"
    _main([*"profile --samples 8 --seq-len 64 --quiet --out".split(), str(out)])
    return out
