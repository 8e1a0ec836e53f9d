"""What the GPTQ and compressed-tensors exports share: reading a moequant folder shard by shard, copying the
files that are not tensors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from moequant.arch import get_arch
from moequant.arch.tiny import tiny_model
from moequant.checkpoint.export_common import ExportError, copy_other_files, read_moequant, shards


@pytest.fixture(scope="module")
def folder(sym4_mixtral):
    return sym4_mixtral  # tests/conftest.py


def test_read_moequant_takes_a_moequant_folder_of_routed_experts_only(folder, tmp_path):
    src, cfg, qc = read_moequant(str(folder), "GPTQ")
    assert src == folder and cfg["model_type"] == "mixtral" and (qc.group_size, qc.sym) == (32, True)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg["quantization_config"]["non_expert"] = "rtn:8"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="the GPTQ export covers routed experts only"):
        read_moequant(other, "GPTQ")
    cfg["quantization_config"]["quant_method"] = "gptq"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="is not a moequant checkpoint"):
        read_moequant(other, "GPTQ")


class _Experts:
    """Stands in for a layer's experts module: keeps the state it is loaded with."""

    def load_state_dict(self, state, strict):
        assert strict
        self.state = state


def test_shards_hand_over_the_other_tensors_and_load_the_experts(folder):
    arch = get_arch(tiny_model("mixtral"))
    modules = {0: _Experts(), 1: _Experts()}
    got = list(shards(folder, arch, modules, lambda k: "disk." + k))
    assert [f for f, _, _ in got] == [
        "model-base.safetensors",
        "model-layer-00000.safetensors",
        "model-layer-00001.safetensors",
    ]
    for f, tensors, loaded in got:
        with safe_open(str(folder / f), "pt") as fh:
            keys = list(fh.keys())
            other = [k for k in keys if ".mlp.experts." not in k]
            assert sorted(tensors) == sorted("disk." + k for k in other), f
            assert all(torch.equal(tensors["disk." + k], fh.get_tensor(k)) for k in other)
            assert loaded == (
                []
                if f == "model-base.safetensors"
                else [int(f.removeprefix("model-layer-").removesuffix(".safetensors"))]
            )
            for i in loaded:
                prefix = f"model.layers.{i}.mlp.experts."
                assert sorted(modules[i].state) == sorted(
                    k.removeprefix(prefix) for k in keys if k.startswith(prefix)
                )


def test_copy_other_files_leaves_out_tensors_config_index_and_card(folder, tmp_path):
    class Writer:
        def copy_in(self, write):
            write(tmp_path)

    copy_other_files(folder, Writer())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bitmap.png", "generation_config.json", "plan.json", "quant_report.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert (tmp_path / "plan.json").read_bytes() == (folder / "plan.json").read_bytes()
