"""Llama 4 (arch/llama4.py): its MoE blocks made to call their experts through the interface compute what
transformers' own blocks compute; the adapter; routing statistics per expert; and a checkpoint in the published
layout (`language_model.` keys, model_type llama4) profiled, planned, quantized and loaded in bf16 in a fresh
process."""

import copy
import subprocess
import sys

import pytest
import torch

from moequant.arch import Activation, ExpertLayout, resolve
from moequant.arch.llama4 import conform
from moequant.arch.tiny import byte_tokenizer, tiny_config


def _original(k: int, dtype=torch.float32, seed: int = 0):
    """A tiny Llama 4 as transformers builds it (not yet conformed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("llama4_text", num_experts_per_tok=k)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("k", [1, 2])
def test_conformed_blocks_compute_what_transformers_does(k):
    model = _original(k)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    mine = copy.deepcopy(model)
    keys = list(mine.state_dict())
    conform(mine)
    conform(mine)  # idempotent
    assert type(mine.model.layers[0].feed_forward).__name__ == "Llama4InterfaceMoe"
    assert list(mine.state_dict()) == keys  # parameters and their names unchanged
    with torch.no_grad():
        got = mine(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_adapter():
    model = _original(2)
    arch, blocks = resolve(model)  # conforms the model itself
    assert len(blocks) == model.config.num_hidden_layers
    assert arch.layout is ExpertLayout.TRANSPOSED_CONCAT and arch.activation is Activation.SILU_GLU
    assert arch.shared == ("shared_expert",) and arch.router == "router"
    f = arch.router_facts
    assert (f.top_k, f.scoring, f.weight_on_input) == (2, "sigmoid", True)
    w = arch.expert_weights(blocks[0].experts)
    E, I, H = 8, model.config.intermediate_size, model.config.hidden_size
    assert w.gate_up.shape == (E, 2 * I, H) and w.down.shape == (E, H, I)
    torch.testing.assert_close(w.gate_up[3], blocks[0].experts.gate_up_proj[3].T)


def test_profile_counts_the_routers_own_choices(tmp_path):
    """The profile's routed counts per expert equal the top-k that transformers' own router picks on the same
    calibration batches (each routed (token, slot) is one row of the experts call)."""
    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.calibration.profiler import ProfileConfig

    k = 2
    model = _original(k)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    seen: dict[int, torch.Tensor] = {}

    def tap(i):
        def hook(_m, _args, out):
            idx = out[1].topk(k, dim=-1).indices  # [T, k] from the router logits
            seen[i] = seen.get(i, 0) + torch.bincount(idx.flatten(), minlength=8)

        return hook

    original = _original(k)  # transformers' own modules, never conformed
    for i, layer in enumerate(original.model.layers):
        layer.feed_forward.router.register_forward_hook(tap(i))
    with torch.no_grad():
        for b in range(0, 8, 4):
            original(input_ids=ids[b : b + 4], use_cache=False)
    prof = api.profile(
        str(tmp_path / "m"),
        CalibData(ids, ["random"] * 8, "ids"),
        ProfileConfig(batch_size=4, progress=False),
    )
    assert sorted(prof.layers) == sorted(seen)
    for i, s in prof.layers.items():
        assert s.counts.tolist() == seen[i].tolist()
        assert s.top_k == k and int(s.counts.sum()) == k * ids.numel()


def _published(folder, k: int = 1):
    """A tiny Llama 4 in the published layout: a model_type llama4 config (text_config inside), the text
    model's keys under `language_model.`, and a vision key the text model has no use for."""
    from safetensors.torch import save_file
    from transformers import Llama4Config

    model = _original(k, torch.bfloat16)
    folder.mkdir()
    sd = {f"language_model.{n}": t.contiguous() for n, t in model.state_dict().items()}
    sd["vision_model.patch_embedding.linear.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    Llama4Config(text_config=model.config.to_dict()).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def test_published_layout_plans_quantizes_and_loads_in_bf16(tmp_path):
    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.calibration.profiler import ProfileConfig
    from moequant.config import QuantizeConfig
    from moequant.plan.config import Budget, PlanConfig

    src = tmp_path / "pub"
    model = _published(src)
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    data = CalibData(ids, ["random"] * 16, "ids")
    prof = api.profile(str(src), data, ProfileConfig(batch_size=4, progress=False))
    assert len(prof.layers) == model.config.num_hidden_layers
    plan = api.plan(str(src), prof, PlanConfig(Budget(bits=4.0), group_size=32, progress=False), data)
    assert sorted(plan.layers) == sorted(prof.layers) and all(len(s) == 8 for s in plan.layers.values())
    out = tmp_path / "q"
    api.quantize(str(src), plan, data, out, QuantizeConfig(progress=False, batch_size=4, min_tokens=1))
    code = (
        "import torch, moequant, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.bfloat16)\n"
        "assert type(m.model.layers[0].feed_forward.experts).__name__ == 'QuantizedExperts'\n"
        "ids = torch.arange(1, 33)[None]\n"
        "torch.save(m(ids).logits.float().detach(), sys.argv[1])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, str(tmp_path / "l.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "l.pt")
    with torch.no_grad():
        ref = model.float()(input_ids=torch.arange(1, 33)[None]).logits
    assert torch.isfinite(got).all()
    assert (
        float((got - ref).norm() / ref.norm()) < 0.06
    )  # 0.020 here: about 4 bits per expert weight, in bf16
