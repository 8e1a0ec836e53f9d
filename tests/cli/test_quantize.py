"""`moequant quantize`: --resume with nothing to resume, every check before the slow passes, remote model code."""

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch

from moequant.cli.main import main

FAST = ["--samples", "4", "--seq-len", "32", "--quiet"]


@pytest.fixture
def calib(small_calib) -> list[str]:
    """FAST calibration from a small text file (conftest.small_calib): the runs below check what the command
    does with its output and its messages, not which text calibrates it."""
    return ["--calib", str(small_calib), *FAST]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_resume_with_no_partial_output_starts_a_fresh_run(tmp_path, caplog, one_thread, calib):
    args = ["quantize", "--uniform", "--bits", "4", "--method", "rtn", *calib]
    with caplog.at_level(logging.WARNING, logger="moequant"):
        assert main([*args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    fresh = [r.getMessage() for r in caplog.records if "no interrupted run" in r.getMessage()]
    assert fresh == [f"no interrupted run in {tmp_path / 'resumed.partial'}: starting a fresh run"]
    assert not (tmp_path / "resumed.partial").exists()
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["quantization_config"]["status"] == "complete"
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    resumed, plain = _files(tmp_path / "resumed"), _files(tmp_path / "plain")
    assert resumed and resumed == plain  # the same run as one without --resume


# ---- every argument and input check before the slow passes -----------------------------------------


@pytest.fixture
def no_slow_pass(monkeypatch):
    """Every slow step of the command raises if reached: the checks must refuse first."""
    import moequant.calibration.data as calib_data
    from moequant import api

    def slow(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} ran before the bad input was refused")

        return refuse

    for name in ("load_tokenizer", "make_plan_for", "make_uniform_plan", "profile", "plan", "quantize"):
        monkeypatch.setattr(api, name, slow(f"api.{name}"))
    monkeypatch.setattr(calib_data, "build_calibration", slow("build_calibration"))


def _make_out(tmp):
    (tmp / "q").mkdir()
    (tmp / "q" / "config.json").write_text("{}")


def _make_partial(tmp):
    (tmp / "q.partial").mkdir()


def _bad_plan(tmp):
    (tmp / "plan.json").write_text("{not json")


CASES = [
    ([], _make_out, "already exists; pass --overwrite"),
    (["--uniform", "--bits", "4"], _make_out, "already exists; pass --overwrite"),
    ([], _make_partial, "holds an interrupted run"),
    (["--plan", "{tmp}/plan.json"], _bad_plan, "is not valid JSON"),
    (["--plan", "{tmp}/missing.json"], None, "does not exist"),
    (["--bits", "3", "--plan", "{tmp}/plan.json"], _bad_plan, "give one of --bits, --gb, --plan"),
    (["--uniform", "--gb", "2"], None, "not --gb"),
    (["--uniform", "--bits", "3.5"], None, "integer width"),
    (["--bits", "1.5"], None, "impossible budget"),
    (["--method", "keep"], None, "use it with --uniform"),
    (["--uniform", "--bits", "5"], None, "invalid width 5"),
    (["--non-expert", "awq:4"], None, "unknown method 'awq'"),
    (["--min-tokens", "-1"], None, "min_tokens must be >= 0"),
    (["{tmp}/no-such-model"], None, "does not exist"),
]


@pytest.mark.parametrize("extra,prepare,needle", CASES)
def test_bad_input_is_refused_before_any_slow_pass(tmp_path, capsys, no_slow_pass, extra, prepare, needle):
    if prepare:
        prepare(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    t0 = time.perf_counter()
    rc = main(["quantize", *args, "--out", str(tmp_path / "q"), *FAST])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert elapsed < 2.0, elapsed  # a profile pass of even the bundled model takes longer


def test_a_good_command_passes_the_checks(tmp_path, no_slow_pass):
    """The fixture does refuse the slow passes: a valid command reaches one (so the cases above would
    have seen it had the checks come later)."""
    with pytest.raises(AssertionError, match="ran before"):
        main(["quantize", "--uniform", "--bits", "4", "--out", str(tmp_path / "q"), *FAST])


# ---- remote model code ------------------------------------------------------------------------------


def _remote_code_model(folder: Path, marker: Path) -> Path:
    """A tiny qwen3_moe saved as the custom model type "mymoe", whose classes live in the folder's own code
    (config.json auto_map). Its weights are stored in the fused layout the model class holds: transformers
    converts per-expert checkpoint keys by model type, and has no conversion for a type it does not know."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moequant.arch.tiny import save_tiny

    save_tiny("qwen3_moe", folder, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg |= {
        "model_type": "mymoe",
        "architectures": ["MyMoEForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_mymoe.MyMoEConfig",
            "AutoModelForCausalLM": "modeling_mymoe.MyMoEForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "configuration_mymoe.py").write_text(
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        "from transformers import Qwen3MoeConfig\n\n\n"
        "class MyMoEConfig(Qwen3MoeConfig):\n    model_type = 'mymoe'\n"
    )
    (folder / "modeling_mymoe.py").write_text(
        "from transformers import Qwen3MoeForCausalLM\n\nfrom .configuration_mymoe import MyMoEConfig\n\n\n"
        "class MyMoEForCausalLM(Qwen3MoeForCausalLM):\n    config_class = MyMoEConfig\n"
    )
    return folder


def test_trust_remote_code_reaches_the_model(tmp_path, capsys, one_thread, calib):
    from transformers import AutoModelForCausalLM

    import moequant  # noqa: F401  (registers the moequant format with transformers)
    from moequant.modules.qexperts import QuantizedExperts

    marker = tmp_path / "CODE_RAN"
    src = _remote_code_model(tmp_path / f"mymoe_{tmp_path.name}", marker)
    marker.unlink(missing_ok=True)  # save_tiny never imports the folder's code, but be sure
    out = tmp_path / "D"
    args = ["quantize", str(src), "--uniform", "--bits", "4", "--method", "rtn", *calib, "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-remote-code" in err[0] and "mymoe" in err[0], err
    assert not marker.exists() and not out.exists() and not Path(f"{out}.partial").exists()

    assert main([*args, "--trust-remote-code"]) == 0
    assert marker.exists()  # the folder's own code ran: the flag reached the model, not only the tokenizer
    assert {"configuration_mymoe.py", "modeling_mymoe.py"} <= {p.name for p in out.iterdir()}
    quant = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(quant).__name__ == "MyMoEForCausalLM"
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in quant.model.layers)
    orig = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = orig(ids).logits, quant(ids).logits.float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel  # 4-bit RTN of the same weights, not a fresh random model


# ---- too thin a calibration -------------------------------------------------------------------------


@pytest.fixture
def slow_passes_refused(monkeypatch):
    """The planning passes (damage, probe) and the quantize pass raise if reached."""
    import moequant.plan.planner as planner
    from moequant import api

    def slow(*args, **kwargs):
        raise AssertionError("a slow pass ran")

    monkeypatch.setattr(planner, "damage_for", slow)
    monkeypatch.setattr(api, "quantize", slow)


def test_thin_calibration_stops_before_the_slow_passes(tmp_path, capsys, slow_passes_refused, one_thread):
    (tmp_path / "three-words.txt").write_text("alpha beta gamma\n")
    args = ["quantize", "--calib", str(tmp_path / "three-words.txt"), "--seq-len", "4", "--out", str(tmp_path / "q"),
            "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the corpus's own "sampling with overlap"
    assert err.startswith(
        "moequant quantize: error: calibration too thin for GPTQ: 512 calibration tokens"
    ), err
    assert re.search(r"leave (\d+) of 32 experts below --min-tokens 32", err), err
    assert int(re.search(r"leave (\d+) of 32", err).group(1)) > 8
    for fix in ("--samples", "--seq-len", "--calib-mode all", "--allow-thin-calibration"):
        assert fix in err, err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    for insist in (["--allow-thin-calibration"], ["--calib-mode", "all"]):  # the user insists, or fixes it
        with pytest.raises(AssertionError, match="a slow pass ran"):
            main([*args, *insist])


def test_thin_calibration_of_a_uniform_gptq_width_is_estimated(tmp_path, capsys, slow_passes_refused):
    (tmp_path / "three-words.txt").write_text("alpha beta gamma\n")
    args = ["quantize", "--uniform", "--bits", "4", "--calib", str(tmp_path / "three-words.txt"), "--seq-len", "4",
            "--out", str(tmp_path / "q"), "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "distinct calibration tokens leave 32 of 32 experts below --min-tokens 32" in err, err
    with pytest.raises(AssertionError, match="a slow pass ran"):  # RTN builds no Hessian: nothing to refuse
        main([*args, "--method", "rtn"])


# ---- the closing table's time, and Ctrl-C ------------------------------------------------------------


def test_closing_time_is_the_whole_command_with_each_pass(tmp_path, capsys, one_thread, calib):
    t0 = time.perf_counter()
    args = [
        "quantize",
        "--bits",
        "3",
        "--no-layer-probe",
        "--min-tokens",
        "0",
        *calib,
        "--out",
        str(tmp_path / "q"),
    ]
    assert main(args) == 0
    whole = time.perf_counter() - t0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("time:")][0]
    m = re.fullmatch(r"time: ([\d.]+) s \((.*)\) -> (.*)", line)
    assert m, line
    passes = dict(re.fullmatch(r"(\w+) ([\d.]+) s", p).groups() for p in m.group(2).split(", "))
    assert list(passes) == ["profile", "damage", "quantize", "write", "other"], line
    total = float(m.group(1))
    assert abs(total - whole) < 0.5, (total, whole)  # main()'s whole run, not the quantize pass alone
    assert abs(sum(float(v) for v in passes.values()) - total) < 0.5, line


def test_ctrl_c_names_the_partial_folder_and_the_resume_command(
    tmp_path, capsys, monkeypatch, one_thread, calib
):
    import shlex

    import moequant.checkpoint.writer as writer

    real = writer.CheckpointWriter.write_shard
    shards = []

    def interrupted_at_layer_1(self, name, tensors):
        shards.append(name)
        if len(shards) == 2:
            raise KeyboardInterrupt
        return real(self, name, tensors)

    monkeypatch.setattr(writer.CheckpointWriter, "write_shard", interrupted_at_layer_1)
    out = tmp_path / "q"
    args = ["quantize", "--uniform", "--bits", "4", "--method", "rtn", *calib, "--out", str(out)]
    assert main(args) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"kept in {out}.partial" in lines[0], lines[0]
    command = lines[0].split("continue with: ")[1]
    assert command == shlex.join(["moequant", *args, "--resume"])
    monkeypatch.setattr(writer.CheckpointWriter, "write_shard", real)
    assert main(shlex.split(command)[1:]) == 0  # the printed command, as given, finishes the run
    assert json.loads((out / "config.json").read_text())["quantization_config"]["status"] == "complete"


def test_ctrl_c_before_the_partial_folder_offers_no_resume(tmp_path, capsys, monkeypatch):
    from moequant import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "load_tokenizer", interrupted)
    assert main(["quantize", "--uniform", "--bits", "4", *FAST, "--out", str(tmp_path / "q")]) == 130
    assert (
        capsys.readouterr().err.strip() == "moequant quantize: interrupted"
    )  # nothing was written to resume
