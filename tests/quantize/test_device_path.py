"""The device path on CPU: what a GPU run executes (the batched torch GPTQ backend, activations offloaded to
host memory and moved per batch, an explicit --device) runs in the CPU tests; the CPU default's bytes stay
those of the per-expert LAPACK path; a device that is not there is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from moequant import api
from moequant.cli.main import main
from moequant.config import GPTQBackend, GPTQOptions, Method, QuantizeConfig, QuantSpec
from moequant.errors import CheckpointError, MoEQuantError
from moequant.runtime.devices import resolve_device


def _shards(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
def test_torch_backend_and_offload_run_on_cpu(tmp_path, uniform3_args, bundled_uniform3, one_thread):
    """conftest.bundled_uniform3 is `moequant <uniform3_args>` with default options, on one thread as here."""

    def _quantize(name: str, *extra: str):
        assert main([*uniform3_args, "--out", str(tmp_path / name), *extra]) == 0
        return tmp_path / name

    default = bundled_uniform3
    offloaded = _quantize("offloaded", "--device", "cpu", "--gptq-backend", "lapack", "--offload-activations")
    torch_backend = _quantize("torch", "--gptq-backend", "torch")
    # auto on CPU is lapack, and offloading moves tensors, never changes them
    assert _shards(offloaded) == _shards(default)
    assert _shards(torch_backend) != _shards(default)  # another backend did run

    def errors(folder):
        rows = json.loads((folder / "quant_report.json").read_text())["experts"]
        return [r["rel_weight_error"] for r in rows], [r.get("gate_up_gptq_loss") for r in rows]

    (err_a, loss_a), (err_b, loss_b) = errors(default), errors(torch_backend)
    assert sum(err_b) == pytest.approx(sum(err_a), rel=0.01)  # the same algorithm, other rounding
    assert sum(x for x in loss_b if x) == pytest.approx(sum(x for x in loss_a if x), rel=0.02)
    report = json.loads((torch_backend / "quant_report.json").read_text())
    assert report["config"]["gptq_backend"] == "torch" and report["config"]["device"] == "cpu"
    assert report["world_size"] == 1


def test_api_quantize_with_the_torch_backend_beats_rtn(tmp_path, small_calib):
    tok = api.load_tokenizer(None)
    data = api.calibration(tok, api.CalibConfig(str(small_calib), samples=16, seq_len=128))
    spec = QuantSpec(Method.GPTQ, 3)
    plan = api.make_uniform_plan(None, spec, act_order=False)
    cfg = QuantizeConfig(
        gptq=GPTQOptions(act_order=False, static_groups=False, backend=GPTQBackend.TORCH), progress=False
    )
    api.quantize(None, plan, data, tmp_path / "g", cfg)
    rtn = api.make_uniform_plan(None, QuantSpec(Method.RTN, 3), act_order=False)
    api.quantize(None, rtn, data, tmp_path / "r", cfg)
    ids = data.input_ids[:8]

    def loss(folder):
        with torch.no_grad():
            logits = api.load(str(folder))(input_ids=ids).logits.float()  # [B, L, V]
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))

    assert loss(tmp_path / "g") < loss(tmp_path / "r")


def test_devices_that_are_not_there_are_refused(tmp_path, capsys):
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MoEQuantError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MoEQuantError, match="no CUDA device"):
            resolve_device("cuda:1")
        rc = main(["quantize", "--uniform", "--bits", "3", "--device", "cuda", "--out", str(tmp_path / "x")])
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device" in err[0]
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    model = api.load(None)  # on CPU: a pass asked to compute elsewhere says how to fix it
    from moequant.checkpoint.source import open_source

    with pytest.raises(CheckpointError, match="move the model"):
        open_source(model, device="meta")
