"""Resolving a model name and loading model and tokenizer: one-line refusals before anything is loaded."""

import json

import pytest
import torch

from moequant.checkpoint.bundled import bundled_model_path
from moequant.checkpoint.loading import (
    check_model_code,
    default_dtype,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from moequant.errors import CheckpointError, MoEQuantError


def test_model_names_resolve_to_the_bundled_folder_a_local_folder_or_a_hub_id(tmp_path):
    assert resolve_model_path(None) == resolve_model_path("bundled") == str(bundled_model_path())
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="is not a model folder: config.json is missing"):
        resolve_model_path(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "m")) == str(tmp_path / "m")
    assert resolve_model_path("org/some-model") == "org/some-model"  # a Hub id, left to the Hub code


def test_own_model_code_needs_trust_remote_code(tmp_path):
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"auto_map AutoConfig -> evil\.EvilConfig\); pass --trust-remote-code"
    ):
        check_model_code(tmp_path)
    check_model_code(tmp_path, trust_remote_code=True)
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "mixtral"}))
    check_model_code(tmp_path)  # a model type transformers knows: its own code is not needed
    check_model_code(None)


def test_default_dtype():
    assert default_dtype() is default_dtype("cpu") is torch.float32
    assert default_dtype("cuda") is default_dtype(torch.device("cuda", 1)) is torch.bfloat16


def test_refusals_name_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(
        CheckpointError, match="has no .safetensors weights \\(moequant never loads pickled weights\\)"
    ):
        load_model(str(tmp_path))
    with pytest.raises(MoEQuantError, match=f"no usable tokenizer for {tmp_path}"):
        load_tokenizer(str(tmp_path))
