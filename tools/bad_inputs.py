#!/usr/bin/env python
"""Run every bad input the command line is known to refuse and write docs/bad_inputs.md: the command, the exact
stderr it prints and its exit status.

Each case runs as its own process (`moequant ...`, what a user types) in a scratch folder, with the relative
paths shown in the table; the few that need a condition this machine cannot make on demand (memory or disk
running out, Ctrl-C at a given layer) run `python -c` with that condition patched in, as the tests do, and
say so. Offline (HF_HUB_OFFLINE=1) and without a Hub token, so the Hub cases are deterministic.

Usage:
    python tools/bad_inputs.py                   # writes docs/bad_inputs.md (a few minutes on 2 cores)
    python tools/bad_inputs.py --only plan       # the cases whose label contains "plan", printed, not written
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. 0123456789\n" * 60
)
FAST = ["--samples", "4", "--seq-len", "32", "--group-size", "32"]
Q = ["quantize", "model", "--calib", "calib.txt", *FAST]  # the tiny Mixtral: quantize with small calibration


@dataclass(frozen=True)
class Case:
    label: str  # the bad input, in words
    argv: list[str]  # after `moequant`
    setup: Callable[[Path], None] | None = None  # makes what the case needs in the scratch folder
    patch: str | None = None  # Python run before main(argv) in the same process: a simulated condition
    interrupt_after_shards: int | None = None  # SIGINT once this many layer shards are written
    test: str = ""  # the test that checks it
    env: dict = field(default_factory=dict)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _copy_model(name: str) -> Callable[[Path], Path]:
    def copy(d: Path) -> Path:
        shutil.copytree(d / "model", d / name)
        return d / name

    return copy


def _dense(d: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moequant.arch.tiny import byte_tokenizer

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "dense")
    byte_tokenizer().save_pretrained(d / "dense")


def _zaya(d: Path) -> None:
    from moequant.arch.tiny import save_tiny

    save_tiny("zaya", d / "zaya", num_experts_per_tok=1)


def _truncated(d: Path) -> None:
    f = _copy_model("truncated")(d) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _no_tokenizer(d: Path) -> None:
    m = _copy_model("no-tokenizer")(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (m / f).unlink()


def _nan(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = _copy_model("nan")(d) / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.block_sparse_moe.experts.2.w2.weight"][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})


def _pickle(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    m = _copy_model("pickled")(d)
    state = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    torch.save(state, m / "pytorch_model.bin")


def _remote_code(d: Path) -> None:
    m = _copy_model("remote-code")(d)
    _write(m / "evil.py", "from transformers import MixtralConfig\nclass EvilConfig(MixtralConfig):\n"
           "    model_type = 'evil'\n")  # fmt: skip
    cfg = json.loads((m / "config.json").read_text())
    cfg |= {"auto_map": {"AutoConfig": "evil.EvilConfig"}, "model_type": "evil"}
    (m / "config.json").write_text(json.dumps(cfg))


def _plan(name: str, change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        from moequant import api
        from moequant.config import Method, QuantSpec

        good = api.make_uniform_plan(str(d / "model"), QuantSpec(Method.GPTQ, 4, 32)).to_json()
        _write(d / name, json.dumps(change(good)))

    return make


def _with_layer(layer: str, entries) -> Callable[[dict], dict]:
    return lambda good: good | {"layers": {**good["layers"], layer: entries(good["layers"][layer])}}


def _expert(entries: list, e: int, spec: str) -> list:
    return entries[:e] + [spec] + entries[e + 1 :]


def _existing(name: str, file: str | None = None) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).mkdir(parents=True, exist_ok=True)
        if file:
            _write(d / name / file, "{}")

    return make


def _quantized(d: Path) -> None:
    subprocess.run(["moequant", *Q, "--uniform", "--bits", "4", "--method", "rtn", "--out", "done", "--quiet"],
                   cwd=d, check=True, capture_output=True)  # fmt: skip


OOM = ("import torch, moequant.quantize.experts as m\n"
       "class Exhausted:\n    def __init__(self, *a, **k): raise torch.OutOfMemoryError('CPU out of memory')\n"
       "m.HessianAccumulator = Exhausted")  # fmt: skip
FULL_DISK = ("import errno, moequant.checkpoint.writer as w\nreal, n = w.save_file, [0]\n"
             "def full(t, p, metadata=None):\n    n[0] += 1\n"
             "    if n[0] == 2: raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "    return real(t, p, metadata=metadata)\nw.save_file = full")  # fmt: skip

CASES = [
    # ---- argparse's own refusals
    Case(
        "a width that is not a number",
        ["quantize", "--bits", "abc"],
        test="test_argparse_refusals_are_one_line",
    ),
    Case(
        "a count that is not an integer",
        ["plan", "--samples", "many"],
        test="test_argparse_refusals_are_one_line",
    ),
    Case(
        "a choice that does not exist",
        ["quantize", "--calib-mode", "some"],
        test="test_argparse_refusals_are_one_line",
    ),
    Case("a missing argument", ["eval"], test="test_argparse_refusals_are_one_line"),
    Case("an unknown flag", ["quantize", "--no-such-flag"], test="test_argparse_refusals_are_one_line"),
    Case("no command", [], test=""),
    # ---- flags that do not go together, budgets, widths
    Case(
        "two budgets", [*Q, "--bits", "3", "--gb", "2"], test="test_bad_input_is_refused_before_any_slow_pass"
    ),
    Case(
        "--uniform with --gb",
        [*Q, "--uniform", "--gb", "2"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "--uniform with a fractional width",
        [*Q, "--uniform", "--bits", "3.5"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case("a budget below 2 bits", [*Q, "--bits", "1.5"], test="test_impossible_budget"),
    Case("a budget above 16 bits", [*Q, "--bits", "17"], test="test_impossible_budget"),
    Case(
        "--method keep without --uniform",
        [*Q, "--method", "keep"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "a width moequant does not store",
        [*Q, "--uniform", "--bits", "5"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "an unknown non-expert method",
        [*Q, "--non-expert", "awq:4"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "a negative --min-tokens",
        [*Q, "--min-tokens", "-1"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case("--group-sizes that are not integers", ["plan", "--group-sizes", "64,x"], test="test_finer_items"),
    Case("--target vllm without a budget", [*Q, "--target", "vllm"], test=""),
    Case("--target vllm with --asym", [*Q, "--target", "vllm", "--bits", "4.5", "--asym"], test=""),
    Case(
        "GPTQ with MoE layers of different widths (refused once planned)",
        [
            "quantize",
            "--target",
            "vllm",
            "--bits",
            "5.5",
            "--format",
            "gptq",
            "--samples",
            "16",
            "--seq-len",
            "64",
            "--no-layer-probe",
        ],
        test="test_cli_mixed_gptq_refused_before_any_pass",
    ),  # fmt: skip
    # ---- devices
    Case("--device cuda without CUDA (quantize)", [*Q, "--device", "cuda"], test=""),
    Case(
        "--device cuda without CUDA (eval)",
        ["eval", "done", "--device", "cuda"],
        _quantized,
        test="test_device_cuda_without_cuda_is_one_line",
    ),
    Case(
        "--device cuda without CUDA (sweep)",
        ["sweep", "--bits", "3", "--methods", "rtn", "--device", "cuda"],
        test="test_device_cuda_without_cuda_is_one_line",
    ),
    Case("an unknown device", [*Q, "--device", "tpu"], test=""),
    # ---- outputs
    Case(
        "quantize: the output exists",
        [*Q, "--out", "out"],
        _existing("out", "config.json"),
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "quantize: an interrupted run is in the way",
        [*Q, "--out", "out"],
        _existing("out.partial"),
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "plan: the plan file exists",
        ["plan", "--out", "plan.json"],
        lambda d: _write(d / "plan.json", "{}"),
        test="test_an_existing_output_is_refused_without_overwrite",
    ),
    Case(
        "profile: the output folder exists",
        ["profile", "--out", "prof"],
        _existing("prof", "profile.json"),
        test="test_an_existing_output_is_refused_without_overwrite",
    ),
    # ---- models
    Case(
        "a model folder that does not exist",
        ["quantize", "./no-such-model", *FAST],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "a model without MoE blocks",
        [*Q[:1], "dense", *Q[2:], "--uniform", "--bits", "4"],
        _dense,
        test="test_model_without_moe_blocks",
    ),
    Case(
        "a MoE family without router logits",
        [*Q[:1], "zaya", *Q[2:], "--uniform", "--bits", "4"],
        _zaya,
        test="test_unsupported_moe_family_says_why",
    ),
    Case(
        "a truncated safetensors file",
        [*Q[:1], "truncated", *Q[2:], "--uniform", "--bits", "4"],
        _truncated,
        test="test_corrupt_safetensors",
    ),
    Case(
        "no tokenizer files",
        [*Q[:1], "no-tokenizer", *Q[2:], "--uniform", "--bits", "4"],
        _no_tokenizer,
        test="test_missing_tokenizer",
    ),
    Case(
        "a NaN in the weights",
        [*Q[:1], "nan", *Q[2:], "--uniform", "--bits", "4"],
        _nan,
        test="test_nan_in_weights_names_the_tensor",
    ),
    Case(
        "pickle weights only",
        [*Q[:1], "pickled", *Q[2:], "--uniform", "--bits", "4"],
        _pickle,
        test="test_pickle_weights_are_refused",
    ),
    Case(
        "model code without --trust-remote-code",
        [*Q[:1], "remote-code", *Q[2:], "--uniform", "--bits", "4"],
        _remote_code,
        test="test_remote_code_needs_the_flag",
    ),
    Case(
        "a Hub id that is not there (offline)",
        ["plan", "someorg/no-such-model"],
        test="test_unknown_ids_revisions_and_gated_repos_are_one_line",
    ),
    # ---- calibration
    Case(
        "an empty calibration file",
        [*Q[:2], "--calib", "empty.txt", *FAST, "--uniform", "--bits", "4"],
        lambda d: _write(d / "empty.txt", "\n\n"),
        test="test_empty_and_short_calibration",
    ),
    Case(
        "calibration shorter than --seq-len",
        [*Q[:2], "--calib", "short.txt", *FAST, "--uniform", "--bits", "4"],
        lambda d: _write(d / "short.txt", "hello"),
        test="test_empty_and_short_calibration",
    ),
    Case(
        "too thin a calibration (planned: the routing profile)",
        ["quantize", "--calib", "three-words.txt", "--seq-len", "4", "--out", "thin"],
        lambda d: _write(d / "three-words.txt", "alpha beta gamma\n"),
        test="test_thin_calibration_stops_before_the_slow_passes",
    ),
    Case(
        "too thin a calibration (uniform GPTQ: estimated)",
        [
            "quantize",
            "--uniform",
            "--bits",
            "4",
            "--calib",
            "three-words.txt",
            "--seq-len",
            "4",
            "--out",
            "thin",
        ],
        lambda d: _write(d / "three-words.txt", "alpha beta gamma\n"),
        test="test_thin_calibration_of_a_uniform_gptq_width_is_estimated",
    ),
    # ---- plan files
    Case(
        "a plan file that does not exist",
        [*Q, "--plan", "missing.json"],
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "a plan file that is not JSON",
        [*Q, "--plan", "broken.json"],
        lambda d: _write(d / "broken.json", "{not"),
        test="test_bad_input_is_refused_before_any_slow_pass",
    ),
    Case(
        "a plan missing a MoE layer",
        [*Q, "--plan", "p.json"],
        _plan("p.json", lambda g: g | {"layers": {"0": g["layers"]["0"]}}),
        test="test_plan_that_does_not_match",
    ),
    Case(
        "a plan with too few experts",
        [*Q, "--plan", "p.json"],
        _plan("p.json", _with_layer("0", lambda r: r[:3])),
        test="test_plan_that_does_not_match",
    ),
    Case(
        "a plan entry with an unknown method",
        [*Q, "--plan", "p.json"],
        _plan("p.json", _with_layer("0", lambda r: _expert(r, 2, "awq:4"))),
        test="test_plan_that_does_not_match",
    ),
    Case(
        "a plan entry with a width moequant does not store",
        [*Q, "--plan", "p.json"],
        _plan("p.json", _with_layer("1", lambda r: _expert(r, 5, "gptq:7"))),
        test="test_bad_plan_entry_names_its_layer_expert_and_file",
    ),
    Case(
        "a plan with an unsupported group size",
        [*Q, "--plan", "p.json"],
        _plan("p.json", lambda g: g | {"group_size": 20}),
        test="test_plan_that_does_not_match",
    ),
    # ---- conditions simulated in the process (as the tests do)
    Case(
        "out of memory in the Hessians (simulated)",
        [*Q, "--uniform", "--bits", "4"],
        patch=OOM,
        test="test_out_of_memory_in_hessians_says_what_to_lower",
    ),
    Case(
        "the disk fills up at layer 1 (simulated)",
        [*Q, "--uniform", "--bits", "4", "--out", "full"],
        patch=FULL_DISK,
        test="test_full_disk_while_writing",
    ),
    Case(
        "Ctrl-C after the first layer (SIGINT)",
        ["quantize", "--uniform", "--bits", "4", "--samples", "64", "--seq-len", "256", "--out", "stopped"],
        interrupt_after_shards=1,
        test="test_ctrl_c_names_the_partial_folder_and_the_resume_command",
    ),
    # ---- push
    Case(
        "push without a token", ["push", "done", "me/repo"], _quantized, test="test_no_token_is_a_clear_error"
    ),
    Case("push of a folder that is not a checkpoint", ["push", "calib.txt", "me/repo"], test=""),
]


def _base(d: Path) -> None:
    from moequant.arch.tiny import save_tiny

    save_tiny("mixtral", d / "model", seed=1)
    _write(d / "calib.txt", TEXT)


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    home = tempfile.mkdtemp(prefix="moequant-bad-inputs-hf-")  # no stored token
    return env | {"HF_HUB_OFFLINE": "1", "HF_HOME": home, "PYTHONUNBUFFERED": "1"} | extra


def _shards(folder: Path) -> int:
    return len(list(folder.glob("model-layer-*.safetensors")))


def run_case(case: Case, d: Path) -> tuple[str, int]:
    """The case's stderr (scratch paths made relative) and exit status."""
    if case.setup:
        case.setup(d)
    env = _env(case.env)
    if case.patch:
        code = f"{case.patch}\nimport sys\nfrom moequant.cli.main import main\nsys.exit(main({case.argv!r}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["moequant", *case.argv]
    if case.interrupt_after_shards is None:
        done = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        err, rc = done.stderr, done.returncode
    else:
        proc = subprocess.Popen(
            cmd, cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        partial = d / f"{case.argv[case.argv.index('--out') + 1]}.partial"
        while proc.poll() is None and _shards(partial) < case.interrupt_after_shards:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        err, rc = proc.communicate()[1], proc.returncode
    return err.replace(f"{d}/", "").replace(str(d), "."), rc


PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar's line


def _cell(text: str) -> str:
    """The stderr lines, exactly, without progress bars (`<code>`, so backticks and pipes survive the table)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not PROGRESS.search(ln)]
    quoted = ["<code>" + html.escape(ln, quote=False).replace("|", "&#124;") + "</code>" for ln in lines]
    return "<br>".join(quoted) or "(nothing)"


def table(rows: list[tuple[Case, str, int]]) -> str:
    head = [
        "# Bad inputs and what they print",
        "",
        "Every bad input moequant is known to refuse, run as a user runs it, with the exact stderr and exit status "
        "(2: refused, 130: interrupted). Generated by `python tools/bad_inputs.py` in a scratch folder holding a "
        "tiny random Mixtral (`model`), a calibration text (`calib.txt`) and whatever the case needs; offline and "
        "without a Hub token. `Q` stands for `quantize model --calib calib.txt "
        + " ".join(FAST)
        + "`. Cases marked "
        "simulated patch the condition into the process, as their test does. Progress bars are left out; a line "
        "before the error is a warning or note the input also gets (e.g. sampling a short text with overlap).",
        "",
        "| bad input | command | stderr | exit | test |",
        "|---|---|---|---|---|",
    ]
    q = " ".join(Q)
    out = []
    for case, err, rc in rows:
        command = "moequant " + shlex.join(case.argv) if case.argv else "moequant"
        command = command.replace(f"moequant {q}", "moequant Q")
        out.append(f"| {case.label} | `{command}` | {_cell(err)} | {rc} | {case.test or '-'} |")
    return "\n".join(head + out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default=None, help="run the cases whose label contains this; print, do not write"
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "bad_inputs.md"))
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or args.only in c.label]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moequant-bad-inputs-") as tmp:
        template = Path(tmp) / "template"
        template.mkdir()
        _base(template)
        for k, case in enumerate(cases):
            d = Path(tmp) / f"case{k}"
            shutil.copytree(template, d)
            t0 = time.perf_counter()
            err, rc = run_case(case, d)
            rows.append((case, err, rc))
            print(
                f"[{k + 1}/{len(cases)}] {case.label}: exit {rc} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    text = table(rows)
    if args.only is not None:
        print(text)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
