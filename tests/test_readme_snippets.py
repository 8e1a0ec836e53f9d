"""The README's main job and its load snippets, and the model card's load snippet, run verbatim, read from the
files themselves (no copy here): the main-job command in a fresh folder, then each Python block of the README
that loads its output, then the card's snippet from the folder it made, each in a fresh process (its first
load: a float32 load first would hide a dtype bug behind the adapter cache). After each snippet the test runs
the loaded model once and checks the logits and the dtype transformers gave it."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

CHECK = """
import torch as _torch
_ids = _torch.randint(0, model.config.vocab_size, (1, 8), generator=_torch.Generator().manual_seed(0))
with _torch.no_grad():
    _logits = model(input_ids=_ids).logits
assert _torch.isfinite(_logits.float()).all()
assert sum(type(m).__name__ == "QuantizedExperts" for m in model.modules()) == 4
print("SNIPPET-OK", model.dtype)
"""


def blocks(text: str, lang: str) -> list[str]:
    return [body for got, body in FENCE.findall(text) if got == lang]


def _main_job(readme: str) -> list[str]:
    """The README's main-job command: the first bash block whose command is `moequant quantize ...`."""
    for body in blocks(readme, "bash"):
        for line in body.splitlines():
            cmd = line.split("#", 1)[0].strip()
            if cmd.startswith("moequant quantize"):
                return shlex.split(cmd)
    raise AssertionError("README.md has no ```bash block with a `moequant quantize` command")


def _run_snippet(code: str, cwd: Path) -> str:
    env = dict(os.environ)
    env.pop("MOEQUANT_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", code + CHECK], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{code}\n---\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """A fresh folder after the README's main-job command, and the output folder it names."""
    cwd = tmp_path_factory.mktemp("readme")
    readme = (ROOT / "README.md").read_text()
    cmd = _main_job(readme)
    exe = Path(sys.executable).with_name("moequant")
    argv = [str(exe) if exe.exists() else "moequant", *cmd[1:]]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = [p.name for p in cwd.iterdir() if (p / "config.json").exists()]
    assert len(made) == 1, made
    return cwd, made[0]


def test_readme_load_snippets_run_verbatim(demo):
    cwd, folder = demo
    snippets = [b for b in blocks((ROOT / "README.md").read_text(), "python") if f'"{folder}"' in b]
    assert snippets, f"README.md has no ```python block loading {folder!r}, the main job's output"
    for code in snippets:
        line = _run_snippet(code, cwd)
        assert line.startswith("SNIPPET-OK"), line
        if "dtype=" not in code:  # transformers' default: the checkpoint's own dtype, bfloat16
            assert line == "SNIPPET-OK torch.bfloat16", line


def test_model_card_load_snippet_runs_verbatim(demo):
    cwd, folder = demo
    card = (cwd / folder / "README.md").read_text()
    snippets = [b for b in blocks(card, "python") if "from_pretrained(" in b]
    assert len(snippets) == 1, snippets
    assert _run_snippet(snippets[0], cwd).startswith("SNIPPET-OK"), snippets[0]
