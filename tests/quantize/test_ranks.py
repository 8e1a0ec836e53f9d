"""Expert parallelism on torch.distributed (gloo, CPU): `torchrun --nproc-per-node N -m moequant quantize`
writes the same shards as one process for N = 2 and 4, names every rank in quant_report.json, stops every
rank with one message when one fails, and resumes under torchrun to the clean run's bytes.

The launches calibrate on a small text file (conftest.small_calib): every rank is a process that would
otherwise tokenize the whole bundled corpus first. The one-process references run in this process, on one
intra-op thread as the launches' ranks (OMP_NUM_THREADS=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moequant import api
from moequant.cli.main import main
from moequant.config import Method, QuantSpec

HERE = Path(__file__).resolve().parent
SIZES = ["--samples", "16", "--seq-len", "128", "--quiet"]


@pytest.fixture(scope="module")
def calib(small_calib) -> list[str]:
    return ["--calib", str(small_calib), *SIZES]


def _one_process(*args: str) -> None:
    """`moequant ARGS` as one plain process would run it (WORLD_SIZE unset), in this process, on one
    intra-op thread as the launches' ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(args)) == 0, args
    finally:
        torch.set_num_threads(threads)


def _torchrun(
    n: int, *args: str, script: str | None = None, env=None, cwd=None
) -> subprocess.CompletedProcess:
    target = [str(HERE / script)] if script else ["-m", "moequant"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           *target, *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    # never from the repository root: `-m` puts the working directory on sys.path, where our kernels/ folder
    # shadows the Hugging Face `kernels` package transformers imports
    cwd = cwd or tempfile.gettempdir()
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def mixed_plan(tmp_path_factory) -> Path:
    """The bundled model with every layer mixing widths and methods (GPTQ 2/3/4/8, RTN 3, keep)."""
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3), act_order=False)
    cycle = [QuantSpec(Method.GPTQ, 2), QuantSpec(Method.GPTQ, 4), QuantSpec(Method.RTN, 3),
             QuantSpec(Method.GPTQ, 8), QuantSpec(Method.GPTQ, 3), QuantSpec(Method.KEEP)]  # fmt: skip
    for i, specs in plan.layers.items():
        plan.layers[i] = [cycle[(i + e) % len(cycle)] for e in range(len(specs))]
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return path


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def one_process(mixed_plan, calib, tmp_path_factory) -> Path:
    """The mixed plan quantized by one plain process: the bytes every launch must write."""
    out = tmp_path_factory.mktemp("one") / "q"
    _one_process("quantize", "--plan", str(mixed_plan), *calib, "--out", str(out))
    assert json.loads((out / "quant_report.json").read_text())["world_size"] == 1
    return out


def _same_as_one_process(done: subprocess.CompletedProcess, out: Path, n: int, one_process: Path) -> None:
    """`out`, written by a launch of `n` ranks, holds one process's shards and plan; its report names the n
    ranks, each of which quantized some experts; rank 0 alone printed the closing table."""
    report = json.loads((out / "quant_report.json").read_text())
    assert report["world_size"] == n
    assert {row["rank"] for row in report["experts"]} == set(range(n))  # every rank quantized some experts
    assert done.stdout.count("bits / expert weight") == 1  # one closing table, from rank 0
    one = _shards(one_process)
    assert len(one) == 5  # four layers and the base
    assert _shards(out) == one
    assert json.loads((out / "plan.json").read_text()) == json.loads((one_process / "plan.json").read_text())


@pytest.mark.slow
def test_launches_write_the_bytes_of_one_process(mixed_plan, one_process, calib, tmp_path):
    """Four ranks from the start (two ranks: the launches of the failing-rank test below, which write every
    layer between them and are held to the same bytes)."""
    out = tmp_path / "w4"
    done = _torchrun(4, "quantize", "--plan", str(mixed_plan), *calib, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    _same_as_one_process(done, out, 4, one_process)


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_then_resume_under_torchrun(mixed_plan, one_process, calib, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "--plan", str(mixed_plan), *calib, "--out", str(out)]
    failed = _torchrun(2, *args, script="launch_failing.py", env={"MOEQUANT_TEST_FAIL": "1:2"})
    assert failed.returncode != 0
    errors = [ln for ln in failed.stderr.splitlines() if "moequant quantize" in ln and "error" in ln]
    assert len(errors) == 1, failed.stderr[-3000:]  # one message, from rank 0, naming the failing rank
    assert "(rank 0 of 2): error: rank 1 failed while quantizing the experts of layer 2" in errors[0]
    assert errors[0].endswith("simulated out of memory")
    assert (
        "moequant/" not in failed.stderr
    )  # no traceback from moequant's code (torchrun adds its own report)
    partial = Path(f"{out}.partial")
    assert not out.exists() and partial.is_dir()  # nothing that looks finished
    config = json.loads((partial / "config.json").read_text())
    assert config["quantization_config"]["status"] == "incomplete"
    assert json.loads((partial / "progress.json").read_text())["completed_layers"] == [0, 1]

    # layers 0-1 from the failed launch, 2-3 from the resumed one: two ranks wrote every layer
    resumed = _torchrun(2, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_as_one_process(resumed, out, 2, one_process)


@pytest.mark.slow
def test_plan_under_torchrun_profiles_and_prices_like_one_process(calib, tmp_path):
    """The profile pass and the damage table split their experts across the ranks: the same profile bytes and
    the same plan as one process (without the layer probe: its split is the next test's)."""
    runs = {n: tmp_path / f"p{n}" for n in (1, 2)}
    args = lambda n: ["plan", "--bits", "2.5", "--no-layer-probe", *calib, "--out", str(runs[n] / "plan.json"),
                      "--profile-out", str(runs[n] / "profile")]  # fmt: skip
    _one_process(*args(1))
    done = _torchrun(2, *args(2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (runs[1] / "profile" / "moments.safetensors").read_bytes() == (
        runs[2] / "profile" / "moments.safetensors"
    ).read_bytes()
    plans = [json.loads((runs[n] / "plan.json").read_text()) for n in (1, 2)]
    assert plans[0]["layers"] == plans[1]["layers"]
    assert plans[0]["estimate"] == plans[1]["estimate"]


@pytest.mark.slow
def test_streamed_probe_under_torchrun_splits_its_sequences(calib, tmp_path):
    """The streamed probe cuts its batch of 16 sequences into one piece per rank (6, 5 and 5 on 3 ranks), the
    final hidden states travel so that every rank draws one process's labels, and the ranks' sums add up:
    the per-layer estimates equal one process's up to float rounding (a layer run on 5 sequences instead of
    16), and the plan is the same."""
    runs = {n: tmp_path / f"p{n}" for n in (1, 3)}
    args = lambda n: ["plan", "--bits", "2.5", *calib, "--out", str(runs[n] / "plan.json")]  # noqa: E731
    _one_process(*args(1))
    done = _torchrun(3, *args(3))
    assert done.returncode == 0, done.stderr[-3000:]
    plans = [json.loads((runs[n] / "plan.json").read_text()) for n in (1, 3)]
    probes = [p["estimate"]["loss_increase"] for p in plans]
    assert probes[0].keys() == probes[1].keys() and len(probes[0]) == 4
    for layer, want in probes[0].items():
        assert want > 0 and abs(probes[1][layer] - want) <= 1e-4 * want, (layer, want, probes[1][layer])
    assert plans[0]["layers"] == plans[1]["layers"]


@pytest.mark.slow
def test_passes_over_every_batch_under_split_batches(calib, tmp_path):
    """The ranks run the layer forwards on their own calibration batches; what reads every batch gathers them
    first: the non-expert Linears' and lm_head's Hessians (--non-expert), and signround's drift (its block
    target). Two ranks write one process's bytes. Signround's block target learns a chunk's routed sum, so its
    result depends on which experts share a chunk (one process with another --gptq-chunk-mb differs too):
    one expert per chunk makes the chunks the same on one rank and two."""
    args = lambda out: ["quantize", "--uniform", "--bits", "3", "--method", "signround", "--signround-steps", "4",
                        "--gptq-chunk-mb", "1", "--non-expert", "gptq:8", *calib, "--batch-size", "4",
                        "--out", str(out)]  # fmt: skip
    _one_process(*args(tmp_path / "one"))
    done = _torchrun(2, *args(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert len(one) == 5 and two == one
