"""vLLM with the plugin on a checkpoint whose experts all differ in width inside each layer (conftest.WIDTHS,
gate/up and down apart): every expert's storage is the checkpoint's tensors of that expert, at its width; every
expert computes what moequant's reference computes for it; prompt log-probabilities match transformers +
moequant. Skips without vLLM's venv (conftest.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import moequant  # noqa: F401  (the moequant format for from_pretrained)
from moequant.checkpoint.format import MoEQuantConfig, build_quantized_experts

EXPERTS_KEY = "model.layers.{i}.mlp.experts."  # where moequant writes layer i's experts (transformers' names)


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out |= load_file(str(f))
    return out


def placement_errors(ckpt: dict[str, torch.Tensor], held: dict[str, torch.Tensor], layers) -> list[str]:
    """Every expert tensor of the checkpoint against what vLLM holds under the same layer, expert, projection
    and tensor name: missing, extra, or different in shape, dtype or any value."""
    errors = []
    want = {}
    for i in layers:
        prefix = EXPERTS_KEY.format(i=i)
        want |= {f"{i}.{k[len(prefix) :]}": v for k, v in ckpt.items() if k.startswith(prefix)}
    got = {k: v for k, v in held.items() if ".probe" not in k}
    errors += [f"{k} not held by vLLM" for k in sorted(set(want) - set(got))]
    errors += [f"{k} held by vLLM, not in the checkpoint" for k in sorted(set(got) - set(want))]
    for k in sorted(set(want) & set(got)):
        a, b = want[k], got[k]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            errors.append(f"{k}: checkpoint {a.dtype}{list(a.shape)}, vLLM {b.dtype}{list(b.shape)}")
    return errors


def _config(folder) -> MoEQuantConfig:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return MoEQuantConfig(**{k: v for k, v in qc.items() if k != "quant_method"})


@pytest.mark.slow
def test_every_expert_lands_in_its_own_slot_at_its_own_width(mixed_checkpoint, vllm_dump):
    cfg = _config(mixed_checkpoint)
    record = json.loads((vllm_dump / "dump.json").read_text())
    assert record["labels"] == {str(i): v for i, v in cfg.experts.items()}  # each expert's width, in order
    assert all(len(set(v)) == len(v) for v in record["labels"].values())  # every width apart inside a layer
    held = load_file(str(vllm_dump / "dump.safetensors"))
    errors = placement_errors(checkpoint_tensors(mixed_checkpoint), held, sorted(cfg.specs()))
    assert not errors, errors[:10]


@pytest.mark.slow
def test_each_expert_computes_what_the_reference_computes(mixed_checkpoint, vllm_dump):
    held = load_file(str(vllm_dump / "dump.safetensors"))
    ckpt = checkpoint_tensors(mixed_checkpoint)
    for i, qe in build_quantized_experts(_config(mixed_checkpoint), device="cpu").items():
        prefix = EXPERTS_KEY.format(i=i)
        qe.load_state_dict({k[len(prefix) :]: v for k, v in ckpt.items() if k.startswith(prefix)})
        x = held[f"{i}.probe_input"]  # [T, H]
        for e in range(qe.num_experts):
            want = qe.expert_forward(e, [x.float()])[0]  # [T, H] moequant's reference for expert e
            torch.testing.assert_close(held[f"{i}.probe_output.{e}"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prompt_logprobs_match_transformers(mixed_checkpoint, vllm_dump):
    from moequant.checkpoint.loading import load_model

    record = json.loads((vllm_dump / "dump.json").read_text())
    model = load_model(str(mixed_checkpoint), dtype=torch.float32)
    nll = []
    with torch.no_grad():
        for p in record["prompts"]:
            x = torch.tensor([p])  # [1, L]
            logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)  # [1, L, V]
            nll.append(-logp[0, :-1].gather(-1, x[0, 1:, None]).sum().item())
    n = sum(len(p) - 1 for p in record["prompts"])
    ppl_ref, ppl_vllm = math.exp(sum(nll) / n), math.exp(sum(record["nll"]) / n)
    assert abs(ppl_vllm / ppl_ref - 1) < 0.005, (ppl_ref, ppl_vllm)


def test_placement_check_sees_a_swap_and_a_width_change():
    """The check above fails when two experts' tensors trade places or one holds another width's tensor."""
    g = torch.Generator().manual_seed(0)
    ckpt = {f"model.layers.0.mlp.experts.{e}.gate_up.qweight": torch.randint(0, 99, (8 * (e + 1), 4), generator=g,
                                                                              dtype=torch.int32)
            for e in range(2)} | {f"model.layers.0.mlp.experts.{e}.down.scales": torch.rand(2, 4, generator=g)
                                  for e in range(2)}  # fmt: skip
    held = {f"0.{k.split('experts.')[1]}": v.clone() for k, v in ckpt.items()}
    assert placement_errors(ckpt, held, [0]) == []
    swapped = dict(held)
    swapped["0.0.down.scales"], swapped["0.1.down.scales"] = held["0.1.down.scales"], held["0.0.down.scales"]
    assert len(placement_errors(ckpt, swapped, [0])) == 2
    wider = dict(held)
    wider["0.0.gate_up.qweight"] = held["0.1.gate_up.qweight"]  # expert 1's width in expert 0's slot
    assert placement_errors(ckpt, wider, [0]) == [
        "0.0.gate_up.qweight: checkpoint torch.int32[8, 4], vLLM torch.int32[16, 4]"
    ]
