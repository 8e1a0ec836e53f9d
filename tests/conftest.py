"""Fixtures shared by the test modules.

One intra-op thread: every test starts on one torch thread (a test may set more; the next starts on one
again), and child processes get OMP_NUM_THREADS=1. The tests run tiny models, whose ops gain little from a
second thread, on 2 cores that CI shares with other jobs, where OpenMP's spin-waiting threads make 2-thread
runs many times slower (the runs behind this choice: evals/results/figures_from_code_comments.md, "Test
threads"). What thread counts change is tested where it is the point (tests/quantizers/test_gptq_threads.py
sets its own counts; scipy's BLAS pools are loaded below before OMP_NUM_THREADS is set, so test_gptq_factor
still sees them at the machine's count).

The session fixtures below run one command once for the whole session and hand its output to every test that
only reads it (a test that writes copies it to its own tmp_path first)."""

import os
from pathlib import Path

import pytest
import scipy.linalg  # noqa: F401  (scipy's OpenBLAS starts its pools now, before OMP_NUM_THREADS is set)
import torch

torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # child processes (fresh-process tests, torchrun ranks, the README job)


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A test that sets its own thread count leaves the next test (and its module's fixtures) on one."""
    yield
    torch.set_num_threads(1)


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
    """`moequant ARGV` in this process on one intra-op thread, whatever the caller's count: the thread count
    can change a run's bytes (a near tie in a router rounds the other way: measured, quant_report.json of
    the uniform 3-bit run differs between one and two threads), and the tests that compare these runs with
    others run those on one thread too (child processes: OMP_NUM_THREADS=1)."""
    from moequant.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0, argv
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def uniform3_args(small_calib) -> list[str]:
    """`moequant quantize` arguments of a uniform 3-bit GPTQ run of the bundled model, default options."""
    return [
        *"quantize --uniform --bits 3 --calib".split(),
        str(small_calib),
        *"--samples 16 --seq-len 128 --quiet".split(),
    ]


@pytest.fixture(scope="session")
def bundled_uniform3(tmp_path_factory, uniform3_args) -> Path:
    """`moequant <uniform3_args> --out <dir>/q`, run once in this process: the clean run the SIGKILL test's
    resumed output must equal, the default the device-path test compares its other backends with. Read only."""
    out = tmp_path_factory.mktemp("uniform3") / "q"
    _main([*uniform3_args, "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def profile_calib(small_calib) -> list[str]:
    """The calibration flags of bundled_profile (a plan from it passes the same)."""
    return ["--calib", str(small_calib), *"--samples 8 --seq-len 64 --quiet".split()]


@pytest.fixture(scope="session")
def bundled_profile(tmp_path_factory, profile_calib) -> Path:
    """`moequant profile <profile_calib> --out <dir>` of the bundled model, run once in this process, for the
    tests of `moequant plan --profile`. Read only."""
    out = tmp_path_factory.mktemp("profile") / "prof"
    _main(["profile", *profile_calib, "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def sym4_mixtral(tmp_path_factory) -> Path:
    """A tiny Mixtral at symmetric 4-bit RTN, in moequant's format (one shard per layer, one for the rest): what
    the export tests read (tests/checkpoint/test_export_common.py, tests/cli/test_export.py)."""
    from moequant import api
    from moequant.arch.tiny import byte_tokenizer, tiny_model
    from moequant.calibration.data import CalibData
    from moequant.config import Method, QuantizeConfig, QuantSpec

    out = tmp_path_factory.mktemp("export") / "q"
    model = tiny_model("mixtral", seed=1)
    data = CalibData(
        torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), ["x"] * 2, "ids"
    )
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32, sym=True))
    api.quantize(model, plan, data, out, QuantizeConfig(progress=False), tokenizer=byte_tokenizer())
    return out


@pytest.fixture(scope="session")
def q3(tmp_path_factory) -> Path:
    """The bundled model at 3 bits (budget planner + GPTQ), calibrated on 6 x 128 tokens of every domain, made
    once for the session: the checkpoint the drift, integrity and `moequant eval` tests read (`moequant eval`
    writes its report and card into it: tests/cli/test_evaluate.py)."""
    from moequant import api
    from moequant.calibration.corpus import load_split
    from moequant.calibration.data import CalibData
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.config import QuantizeConfig
    from moequant.plan.config import Budget, PlanConfig

    tok = load_tokenizer(None)
    windows = []
    for text in load_split("train").values():
        ids = tok(text[:5_000], add_special_tokens=False)["input_ids"]
        windows.append(torch.tensor(ids[:128]))
    data = CalibData(torch.stack(windows), ["train"] * len(windows), "6 x 128 tokens, one window per domain")
    plan, prof = api.make_plan_for(None, data, PlanConfig(Budget(bits=3.0)), progress=False)
    out = tmp_path_factory.mktemp("eval") / "tiny-moe-3b"
    api.quantize(None, plan, data, out, QuantizeConfig(progress=False), tokenizer=tok, profile_result=prof)
    return out
