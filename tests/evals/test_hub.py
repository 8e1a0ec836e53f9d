"""Pushing to the Hub, before any request: which folders may be pushed, where the token comes from, and that it
is masked in messages. (The push itself, against a fake Hub: tests/cli/test_push.py.)"""

import json

import pytest

from moequant.errors import MoEQuantError
from moequant.evals.hub import _mask, check_pushable, resolve_token


def _write_config(folder, quantization_config):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"quantization_config": quantization_config}))
    return folder


def test_only_a_complete_moequant_folder_with_weights_is_pushable(tmp_path):
    with pytest.raises(MoEQuantError, match=r"q\.partial is an unfinished quantization"):
        check_pushable(tmp_path / "q.partial")
    (tmp_path / "q.partial").mkdir()
    with pytest.raises(MoEQuantError, match=r"q is not a folder \(.*q\.partial holds an interrupted run\)"):
        check_pushable(tmp_path / "q")
    (tmp_path / "q").mkdir()
    with pytest.raises(MoEQuantError, match="has no config.json"):
        check_pushable(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text("{")
    with pytest.raises(MoEQuantError, match="is not valid JSON"):
        check_pushable(tmp_path / "q")
    _write_config(tmp_path / "q", {"quant_method": "gptq"})
    with pytest.raises(MoEQuantError, match="not a moequant checkpoint"):
        check_pushable(tmp_path / "q")
    _write_config(tmp_path / "q", {"quant_method": "moequant", "status": "incomplete"})
    with pytest.raises(MoEQuantError, match="incomplete moequant checkpoint \\(status 'incomplete'\\)"):
        check_pushable(tmp_path / "q")
    _write_config(tmp_path / "q", {"quant_method": "moequant", "status": "complete"})
    with pytest.raises(MoEQuantError, match="has no .safetensors weights"):
        check_pushable(tmp_path / "q")
    (tmp_path / "q" / "model.safetensors").write_bytes(b"")
    assert check_pushable(str(tmp_path / "q")) == tmp_path / "q"


def test_the_token_is_the_argument_else_hf_token_else_the_stored_login(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_token("hf_arg") == "hf_arg"
    assert resolve_token() == "hf_env"
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token() == "hf_stored"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(MoEQuantError, match="no Hugging Face token"):
        resolve_token()


def test_the_token_is_masked():
    assert _mask("401 for hf_abc at https://x/hf_abc", "hf_abc") == "401 for *** at https://x/***"
    assert _mask("no token here", "") == "no token here"
