"""Reliability: resume after SIGKILL, determinism, one clear message per bad input, security, soak.

Every bad-input case goes through the CLI and checks: exit status 2, one line on stderr naming the problem,
no traceback, and no output folder that looks finished.
"""

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import noise_router, tiny_llama

import moequant
from moequant.arch.tiny import byte_tokenizer, save_tiny
from moequant.cli.main import main

REPO = Path(moequant.__file__).resolve().parents[1]
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. 0123456789\n" * 60
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Mixtral folder and a calibration text."""
    d = tmp_path_factory.mktemp("tiny")
    save_tiny("mixtral", d / "model", seed=1)
    (d / "calib.txt").write_text(TEXT)
    return d


def _run(args, capsys):
    capsys.readouterr()  # what the test's setup printed (e.g. save_pretrained's progress bar) is not the run's
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.err


def _fails_cleanly(args, capsys, out: Path, *needles):
    rc, err = _run([*args, "--quiet"], capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() or not (out / "config.json").exists()  # nothing that looks finished


def _quant_args(model, calib, out, *extra):
    # 128 calibration tokens are too thin for GPTQ (tests/cli/test_quantize.py): these cases are about the rest
    return [
        "quantize",
        str(model),
        "--calib",
        str(calib),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--group-size",
        "32",
        "--allow-thin-calibration",
        "--out",
        str(out),
        *extra,
    ]


# ---- resume and determinism -------------------------------------------------------------------------


def _progress(partial: Path) -> list[int]:
    try:
        return json.loads((partial / "progress.json").read_text())["completed_layers"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_sigkill_then_resume_gives_the_clean_runs_bytes(tmp_path, uniform3_args, bundled_uniform3):
    """A run killed after its first layer and resumed (each a fresh process) writes the files of a clean run
    of the same command (conftest.bundled_uniform3, run once for the session), byte for byte."""
    out = tmp_path / "killed" / "q"
    cmd = [sys.executable, "-m", "moequant.cli", *uniform3_args, "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # the clean run's thread count
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    partial = Path(f"{out}.partial")
    deadline = time.time() + 300
    while time.time() < deadline and len(_progress(partial)) < 1 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _progress(partial)
    assert 1 <= len(done) < 4 and not out.exists()
    from transformers import AutoModelForCausalLM

    from moequant.errors import CheckpointError

    with pytest.raises(CheckpointError, match="incomplete.*--resume"):
        AutoModelForCausalLM.from_pretrained(partial)
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean_out = bundled_uniform3  # the same args, --out .../q
    assert clean_out.name == out.name
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in clean_out.iterdir())
    assert not partial.exists()
    for name in names:
        assert (out / name).read_bytes() == (clean_out / name).read_bytes(), name


def test_two_runs_are_byte_identical(tiny, tmp_path, capsys):
    for run in ("a", "b"):
        rc, err = _run(
            _quant_args(tiny / "model", tiny / "calib.txt", tmp_path / run / "q", "--bits", "3.5", "--quiet"),
            capsys,
        )
        assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "a" / "q").glob("*.safetensors"))
    assert files
    for f in files:
        assert (tmp_path / "a" / "q" / f).read_bytes() == (tmp_path / "b" / "q" / f).read_bytes(), f


# ---- bad inputs -------------------------------------------------------------------------------------


def test_model_without_moe_blocks(tmp_path, capsys):
    tiny_llama(vocab_size=256).save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "c.txt").write_text(TEXT)
    _fails_cleanly(
        _quant_args(tmp_path / "dense", tmp_path / "c.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        "no Mixture-of-Experts",
    )


def test_unsupported_moe_family_says_why(tmp_path, capsys, monkeypatch):
    """A router whose outputs hold no logits that give its experts their weights (helpers.noise_router; every
    installed family derives an adapter now): no adapter, and the error says so."""
    from moequant.arch.lookup import forget_adapters

    save_tiny("mixtral", tmp_path / "z")
    noise_router(monkeypatch)
    (tmp_path / "c.txt").write_text(TEXT)
    capsys.readouterr()  # save_pretrained's own progress bar
    try:
        _fails_cleanly(
            _quant_args(tmp_path / "z", tmp_path / "c.txt", tmp_path / "o", "--uniform", "--bits", "4"),
            capsys,
            tmp_path / "o",
            "router logits",
        )
    finally:
        forget_adapters()


def test_corrupt_safetensors(tiny, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny / "model", tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails_cleanly(
        _quant_args(tmp_path / "m", tiny / "calib.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        "model.safetensors",
    )


def test_missing_tokenizer(tiny, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny / "model", tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / f).unlink()
    _fails_cleanly(
        _quant_args(tmp_path / "m", tiny / "calib.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        "tokenizer",
    )


def test_empty_and_short_calibration(tiny, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    _fails_cleanly(
        _quant_args(tiny / "model", tmp_path / "empty.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        "empty",
    )
    (tmp_path / "short.txt").write_text("hello")
    _fails_cleanly(
        _quant_args(tiny / "model", tmp_path / "short.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        "shorter than the sequence length",
    )


@pytest.mark.parametrize("bits,needle", [("1.5", "impossible budget"), ("17", "impossible budget")])
def test_impossible_budget(tiny, tmp_path, capsys, bits, needle):
    _fails_cleanly(
        _quant_args(tiny / "model", tiny / "calib.txt", tmp_path / "o", "--bits", bits),
        capsys,
        tmp_path / "o",
        needle,
    )


def test_plan_that_does_not_match(tiny, tmp_path, capsys):
    from moequant import api
    from moequant.config import Method, QuantSpec

    plan = api.make_uniform_plan(str(tiny / "model"), QuantSpec(Method.GPTQ, 4, 32))
    good = plan.to_json()
    cases = [
        ({"layers": {"0": good["layers"]["0"]}}, "layers"),
        ({"layers": {"0": good["layers"]["0"][:3], "1": good["layers"]["1"]}}, "3 experts"),
        ({"layers": {"0": ["awq:4"] * 8, "1": good["layers"]["1"]}}, "unknown method 'awq'"),
        ({"layers": {"0": ["gptq:5"] * 8, "1": good["layers"]["1"]}}, "invalid width 5"),
        ({"group_size": 20}, "group size 20"),
    ]
    for change, needle in cases:
        p = tmp_path / "plan.json"
        p.write_text(json.dumps(good | change))
        _fails_cleanly(
            _quant_args(tiny / "model", tiny / "calib.txt", tmp_path / "o", "--plan", str(p)),
            capsys,
            tmp_path / "o",
            needle,
        )


def test_bad_plan_entry_names_its_layer_expert_and_file(tiny, tmp_path, capsys):
    from moequant import api
    from moequant.config import Method, QuantSpec

    good = api.make_uniform_plan(str(tiny / "model"), QuantSpec(Method.GPTQ, 4, 32)).to_json()
    good["layers"]["1"][5] = "gptq:7"
    p = tmp_path / "edited-plan.json"
    p.write_text(json.dumps(good))
    _fails_cleanly(
        _quant_args(tiny / "model", tiny / "calib.txt", tmp_path / "o", "--plan", str(p)),
        capsys,
        tmp_path / "o",
        str(p),
        "layer 1 expert 5",
        "invalid width 7",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_device_cuda_without_cuda_is_one_line(tiny, tmp_path, capsys, command):
    if command == "eval":  # a real folder: the device is what is wrong
        rc, err = _run(
            _quant_args(
                tiny / "model",
                tiny / "calib.txt",
                tmp_path / "q",
                "--uniform",
                "--bits",
                "4",
                "--method",
                "rtn",
                "--quiet",
            ),
            capsys,
        )
        assert rc == 0, err
    out = tmp_path / "report"
    args = {
        "eval": ["eval", str(tmp_path / "q"), "--out", str(out)],
        "sweep": ["sweep", "--bits", "3", "--methods", "rtn", "--out", str(out)],
    }[command]
    _fails_cleanly([*args, "--device", "cuda"], capsys, out, "--device cuda", "no CUDA device")
    assert not out.exists()


def test_nan_in_weights_names_the_tensor(tiny, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny / "model", tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    t = load_file(f)
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    t[name][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    _fails_cleanly(
        _quant_args(tmp_path / "m", tiny / "calib.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        name,
        "NaN",
    )


def test_out_of_memory_in_hessians_says_what_to_lower(tiny, tmp_path, capsys, monkeypatch):
    import moequant.quantize.expert_hessians as ql

    class Exhausted:
        def __init__(self, *a, **k):
            raise torch.OutOfMemoryError("CPU out of memory")

    monkeypatch.setattr(ql, "HessianAccumulator", Exhausted)
    out = tmp_path / "o"
    _fails_cleanly(
        _quant_args(tiny / "model", tiny / "calib.txt", out, "--uniform", "--bits", "4"),
        capsys,
        out,
        "out of memory",
        "--samples",
    )


def test_full_disk_while_writing(tiny, tmp_path, capsys, monkeypatch):
    import moequant.checkpoint.writer as w

    calls = {"n": 0}
    real = w.save_file

    def full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second layer's shard hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(w, "save_file", full)
    out = tmp_path / "o"
    _fails_cleanly(
        _quant_args(tiny / "model", tiny / "calib.txt", out, "--uniform", "--bits", "4"),
        capsys,
        out,
        "No space left on device",
        "--resume",
    )
    assert not list(Path(f"{out}.partial").glob(".*.tmp"))  # no half-written shard left behind
    monkeypatch.setattr(w, "save_file", real)
    rc, err = _run(
        _quant_args(
            tiny / "model", tiny / "calib.txt", out, "--uniform", "--bits", "4", "--resume", "--quiet"
        ),
        capsys,
    )
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["status"] == "complete"
    assert not Path(f"{out}.partial").exists()


# ---- security ----------------------------------------------------------------------------------------


def test_pickle_weights_are_refused(tiny, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny / "model", tmp_path / "m")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    _fails_cleanly(
        _quant_args(tmp_path / "m", tiny / "calib.txt", tmp_path / "o", "--uniform", "--bits", "4"),
        capsys,
        tmp_path / "o",
        "safetensors",
        "pickle",
    )


def test_no_pickle_loading_in_the_code():
    offenders = []
    folders = ("moequant", "calibration", "kernels", "evals", "tools")  # all the installed package, and tools
    files = [p for d in folders for p in (REPO / d).rglob("*.py")]
    assert len(files) > 60 and any(p.parts[-2:] == ("quantizers", "gptq.py") for p in files)
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    offenders.append(f"{path}: imports pickle")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load":
                base = getattr(node.func.value, "id", "")
                kws = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if base == "torch" and kws.get("weights_only") is not True:
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_remote_code_needs_the_flag(tiny, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny / "model", tmp_path / "m")
    marker = tmp_path / "EXECUTED"
    (tmp_path / "m" / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import MixtralConfig\nclass EvilConfig(MixtralConfig):\n    model_type = 'evil'\n"
    )
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    cfg["model_type"] = "evil"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    rc, err = _run(
        _quant_args(
            tmp_path / "m", tiny / "calib.txt", tmp_path / "o", "--uniform", "--bits", "4", "--quiet"
        ),
        capsys,
    )
    assert rc == 2 and "Traceback" not in err
    assert not marker.exists()  # the repository's code never ran


def test_token_never_printed_logged_or_written(tiny, tmp_path, capsys, caplog, monkeypatch):
    secret = "hf_SECRETmoequantTOKEN123"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "o"
    rc, err = _run(_quant_args(tiny / "model", tiny / "calib.txt", out, "--uniform", "--bits", "4"), capsys)
    assert rc == 0
    assert secret not in err and secret not in caplog.text
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


# ---- soak ------------------------------------------------------------------------------------------


def test_soak_twenty_quantizations_do_not_grow_memory(tmp_path):
    import gc

    import psutil

    from moequant import api
    from moequant.arch.tiny import tiny_model
    from moequant.calibration.data import CalibData
    from moequant.config import Method, QuantizeConfig, QuantSpec

    proc = psutil.Process()
    calib = CalibData(
        torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 4, "r"
    )
    rss = []
    for k in range(20):
        model = tiny_model("qwen3_moe", seed=k)
        plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32))
        api.quantize(model, plan, calib, tmp_path / f"q{k}", QuantizeConfig(progress=False, min_tokens=0))
        del model
        gc.collect()
        rss.append(proc.memory_info().rss)
        import shutil

        shutil.rmtree(tmp_path / f"q{k}")
    first, last = sum(rss[2:7]) / 5, sum(rss[-5:]) / 5  # rounds 3-7 (after warm-up) vs the last five
    assert last - first < 20e6, [r / 1e6 for r in rss]
