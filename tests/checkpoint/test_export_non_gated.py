"""GPTQ and compressed-tensors exports of experts without a gate projection (relu2: Nemotron-H).

A non-gated experts module (up [I, H] and down [H, I] per expert, at symmetric 4 bits) is exported under the key
templates Nemotron-H's checkpoints use (transformers' conversion mapping: `backbone.layers.{i}.mixer.experts.{e}.
up_proj` / `down_proj`, no gate). Checked here: only up and down are written, an independent GPTQ-v1 dequantizer and
the compressed-tensors library's own decompression give moequant's weights (all I rows of up, none taken for a
gate); a gated experts module under templates with no gate is refused; a tiny Nemotron-H quantized whole exports
to both formats with every MoE layer's experts equal to the quantized model's. Where vLLM is at hand (MOEQUANT_VLLM_PYTHON,
or importable), vLLM's own code judges the written names and shapes: NemotronH's expert mapping
(`NemotronHModel.get_expert_mapping`), `RoutedExperts.load_weights` routing each tensor to its parameter, shard and
expert, the parameters shaped by `AutoGPTQMoEMethod.create_weights` / `CompressedTensorsWNA16MoEMethod.create_weights`
for the MoE config vLLM derives from relu2 (`activation_without_mul`: w13 holds up alone), the GPTQ `dynamic` rules
by `get_dynamic_override`, and the compressed-tensors config group by `get_scheme_dict` for every name vLLM asks.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from moequant.arch.base import Activation
from moequant.checkpoint import export_ct, export_gptq
from moequant.checkpoint.export_common import ExportError
from moequant.config import Method, QuantSpec
from moequant.modules.qexperts import QuantizedExperts
from moequant.modules.qlinear import PackedWeight
from moequant.quantizers.packed import PackedLinear

E, H, I, LAYER = 4, 64, 32, 1
# Nemotron-H's per-expert key templates, as transformers' conversion mapping gives them
# (checkpoint.conversion.expert_key_templates("nemotron_h"))
KEYS = {
    "up": "backbone.layers.{i}.mixer.experts.{e}.up_proj.weight",
    "down": "backbone.layers.{i}.mixer.experts.{e}.down_proj.weight",
}
SPEC = QuantSpec(Method.RTN, 4, 32, sym=True)


def _experts(activation: Activation, seed: int = 0) -> QuantizedExperts:
    """E experts at symmetric 4 bits, group 32; gate_up holds activation.in_rows(I) rows."""
    g = torch.Generator().manual_seed(seed)

    def packed(n, k):
        codes = torch.randint(0, 16, (n, k), generator=g)
        scales = (torch.rand(n, math.ceil(k / 32), generator=g) + 0.5) / 64
        return PackedWeight.from_packed(PackedLinear.from_codes(codes, scales, None, 4, 32), SPEC)

    qe = QuantizedExperts([SPEC] * E, H, I, activation, dtype=torch.float32)
    for e in range(E):
        qe.set_expert(e, packed(activation.in_rows(I), H), packed(H, I), SPEC)
    return qe


@pytest.fixture(scope="module")
def qe() -> QuantizedExperts:
    return _experts(Activation.RELU2)


def _unpack(q: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Independent GPTQ-v1 unpacking: 32/bits codes per int32 word, LSB first, along `axis`."""
    per = 32 // bits
    w = q.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if axis == 0:  # [Kw, N] -> [K, N]
        return ((w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(-1, q.shape[1])
    return ((w[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)).reshape(q.shape[0], -1)  # [G, N]


def _dequant_v1(t: dict, stem: str) -> torch.Tensor:
    q = _unpack(t[f"{stem}.qweight"], 4, 0).double()  # [K, N]
    z = _unpack(t[f"{stem}.qzeros"], 4, 1).double() + 1  # [G, N] (v1 stores zero - 1)
    s, gi = t[f"{stem}.scales"].double(), t[f"{stem}.g_idx"].long()  # [G, N], [K]
    return ((q - z[gi]) * s[gi]).T  # [N, K]


def _gptq(qe) -> dict[str, torch.Tensor]:
    return export_gptq._layer_tensors(qe, LAYER, KEYS, 4, 32)


def _ct(qe, scale_dtype=torch.float16) -> tuple[dict, dict[str, torch.Tensor]]:
    qconfig = export_ct.quantization_config(
        {LAYER: 4}, 32, types.SimpleNamespace(layers="model.layers"), "backbone.layers"
    )
    return qconfig, export_ct._layer_tensors(qe, LAYER, KEYS, 4, qconfig, scale_dtype)


def test_gptq_writes_up_and_down_only_with_moequants_weights(qe):
    tensors = _gptq(qe)
    stems = {k.rsplit(".", 1)[0] for k in tensors}
    base = f"backbone.layers.{LAYER}.mixer.experts"
    assert stems == {f"{base}.{e}.{p}" for e in range(E) for p in ("up_proj", "down_proj")}
    for e in range(E):
        up = _dequant_v1(tensors, f"{base}.{e}.up_proj")
        assert up.shape == (I, H)  # all of gate_up: up alone
        assert torch.equal(up, qe.slot(e).gate_up.dequantize(torch.float64))
        assert torch.equal(
            _dequant_v1(tensors, f"{base}.{e}.down_proj"), qe.slot(e).down.dequantize(torch.float64)
        )


def test_compressed_tensors_writes_up_and_down_the_library_decompresses(qe):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    qconfig, tensors = _ct(
        qe, torch.float32
    )  # float32 scales: the library's arithmetic reproduces moequant's
    target = qconfig["config_groups"]["group_4bit"]["targets"][0]
    assert target == r"re:^(?:model\.layers|backbone\.layers)\.(1)\..*\.experts\.\d+\.[^.]+$"
    base = f"backbone.layers.{LAYER}.mixer.experts"
    assert {k.rsplit(".", 1)[0] for k in tensors} == {
        f"{base}.{e}.{p}" for e in range(E) for p in ("up_proj", "down_proj")
    }
    for e in range(E):
        for proj, storage in (("up_proj", qe.slot(e).gate_up), ("down_proj", qe.slot(e).down)):
            module = f"{base}.{e}.{proj}"
            scheme = export_ct.scheme_for(module, qconfig)  # the library's matching, on the folder's names
            assert scheme is not None and scheme.weights.num_bits == 4
            state = {k: tensors[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
            w = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            assert torch.equal(w.float(), storage.dequantize(torch.float32)), module
    assert export_ct.scheme_for("model.layers.1.mixer.experts.0.up_proj", qconfig) is not None  # vLLM's names
    assert export_ct.scheme_for("backbone.layers.0.mixer.experts.0.up_proj", qconfig) is None  # another layer


def test_gated_experts_under_templates_without_a_gate_are_refused(qe):
    gated = _experts(Activation.SILU_GLU, seed=1)
    with pytest.raises(
        ExportError, match=r"gated projections \['down', 'gate', 'up'\].*no key for \['gate'\]"
    ):
        export_gptq.check_projection_keys(KEYS, {LAYER: gated}, "nemotron_h")
    export_gptq.check_projection_keys(KEYS, {LAYER: qe}, "nemotron_h")  # up and down: every key it needs
    assert export_gptq.published_layers(KEYS) == "backbone.layers"


VLLM_CHILD = r"""
import json, sys, types
from fractions import Fraction
import torch
from vllm.model_executor.layers.fused_moe.activation import MoEActivation, activation_without_mul
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQMoEMethod
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 \
    import CompressedTensorsWNA16MoEMethod
from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override
from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM, NemotronHModel

case = json.load(sys.stdin)
E, H, I = case["experts"], case["hidden"], case["inter"]
layer_name = f"model.layers.{case['layer']}.mixer.experts"  # NemotronHMoE's FusedMoE, by vLLM's names
# the MoE facts vLLM derives from the family's activation (NemotronHMoE passes activation_without_mul)
moe = types.SimpleNamespace(activation=MoEActivation.from_str(activation_without_mul(case["act"])), has_bias=False)
moe.is_act_and_mul = FusedMoEConfig.is_act_and_mul.fget(moe)
moe.w13_num_shards = FusedMoEConfig.w13_num_shards.fget(moe)
moe.num_experts = moe.num_logical_experts = E
# the checkpoint projection name NemotronH declares for each shard (w1 -> w13, w2; w3 only when gated)
model = types.SimpleNamespace(has_moe=True, named_parameters=lambda: [], _get_max_n_routed_experts=lambda: E,
                              num_redundant_experts=0)
declared = {s: w.split(".")[2] for _, w, _, s in NemotronHModel.get_expert_mapping(model) if w.startswith("experts.0.")}


class Recorder:
    def __init__(self, shape):
        self.shape, self.calls = shape, []

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        self.calls.append([shard_id, expert_id, list(loaded_weight.shape)])
        return True


def load(method, tensors, mappers):
    # RoutedExperts.load_weights on the layer's tensors; its parameters as the method's create_weights makes them
    holder = torch.nn.Module()
    method.create_weights(holder, E, H, I, torch.bfloat16, weight_loader=None)
    layer = types.SimpleNamespace(
        layer_name=layer_name, moe_config=moe, is_fused_checkpoint_transposed=False, lora_base_layer_prefix="",
        expert_map_manager=types.SimpleNamespace(num_fused_shared_experts=0),
        ckpt_gate_proj_name=declared["w1"], ckpt_down_proj_name=declared["w2"], ckpt_up_proj_name=declared.get("w3"),
        build_expert_params_mapping=RoutedExperts.build_expert_params_mapping)
    layer.get_expert_mapping = types.MethodType(RoutedExperts.get_expert_mapping, layer)
    recs = {n: Recorder(list(p.shape)) for n, p in holder.named_parameters()}
    for n, r in recs.items():
        setattr(layer, n, r)
    weights, dropped, outside = [], [], []
    for key, shape in tensors.items():
        name = key
        for m in mappers:
            name = None if name is None else m._map_name(name)
        if name is None:
            dropped.append(key)
        elif not name.startswith(layer_name + "."):
            outside.append(name)
        else:
            weights.append((name.removeprefix(layer_name + "."), torch.zeros(shape)))
    list(RoutedExperts.load_weights(layer, weights) or [])
    return {"params": {n: {"shape": r.shape, "calls": r.calls} for n, r in recs.items() if r.calls},
            "dropped": dropped, "outside": outside}


mapper = NemotronHForCausalLM.hf_to_vllm_mapper
gcfg = AutoGPTQConfig.from_config(case["gptq"])
gptq = AutoGPTQMoEMethod.__new__(AutoGPTQMoEMethod)  # its __init__ picks a GPU kernel backend; not needed here
gptq.quant_config, gptq.moe, gptq.input_dtype = gcfg, moe, None
out = {"declared": declared, "gated": moe.is_act_and_mul,
       "gptq": load(gptq, case["gptq_tensors"], [gcfg.get_checkpoint_weight_mapper(), mapper]),
       "gptq_dynamic": get_dynamic_override(gcfg, layer_name)}
ccfg = CompressedTensorsConfig.from_config(case["ct"])
ccfg.apply_vllm_mapper(mapper)
# CompressedTensorsMoEMethod.get_moe_method asks for <layer>.0.<gate>, .0.<up> (None when non-gated), .0.<down>
schemes = [ccfg.get_scheme_dict(torch.nn.Module(), f"{layer_name}.0.{declared.get(s)}") for s in ("w1", "w3", "w2")]
out["ct_scheme_bits"] = [None if s is None else s["weights"].num_bits for s in schemes]
w = schemes[0]["weights"]
ct = CompressedTensorsWNA16MoEMethod.__new__(CompressedTensorsWNA16MoEMethod)
ct.moe, ct.num_bits, ct.packed_factor, ct.strategy = moe, w.num_bits, Fraction(32, w.num_bits), w.strategy
ct.symmetric, ct.group_size = w.symmetric, w.group_size
out["ct"] = load(ct, case["ct_tensors"], [mapper])
print(json.dumps(out))
"""


def _vllm_python() -> str | None:
    """A Python with vLLM: MOEQUANT_VLLM_PYTHON, else this one if it imports the real vLLM."""
    exe = os.environ.get("MOEQUANT_VLLM_PYTHON")
    if exe and Path(exe).is_file():
        return exe
    try:
        import vllm

        return sys.executable if getattr(vllm, "__file__", None) else None  # tests/vllm/ is not vLLM
    except ImportError:
        return None


def _check_in_vllm(gptq_config: dict, ct_config: dict, gptq: dict, ct: dict, experts: int, hidden: int, inter: int,
                   layer: int, act: str = "relu2") -> None:  # fmt: skip
    """Run VLLM_CHILD on one MoE layer's exported tensors (`act`: the family config's mlp_hidden_act) and assert
    what vLLM's code does with them."""
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM not importable (set MOEQUANT_VLLM_PYTHON to a Python with vLLM, e.g. its own venv)")
    case = {
        "experts": experts, "hidden": hidden, "inter": inter, "layer": layer, "act": act,
        "gptq": gptq_config, "ct": ct_config,
        "gptq_tensors": {k: list(v.shape) for k, v in gptq.items()},
        "ct_tensors": {k: list(v.shape) for k, v in ct.items()},
    }  # fmt: skip
    env = dict(
        os.environ, PYTHONSAFEPATH="1"
    )  # the repository's kernels/ must not shadow the `kernels` package
    proc = subprocess.run(
        [python, "-c", VLLM_CHILD], input=json.dumps(case), capture_output=True, text=True, env=env, cwd="/",
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["declared"] == {"w1": "up_proj", "w2": "down_proj"} and got["gated"] is False
    shard_of = {"up_proj": "w1", "down_proj": "w2"}
    for fmt, tensors, suffixes in (
        ("gptq", gptq, ("qweight", "scales", "qzeros")),
        ("ct", ct, ("weight_packed", "weight_scale", "weight_shape")),
    ):
        res = got[fmt]
        assert res["outside"] == []
        assert sorted(res["dropped"]) == sorted(
            k for k in tensors if k.endswith(".g_idx")
        )  # vLLM drops g_idx
        for proj, shard in shard_of.items():
            for suffix in suffixes:
                name = f"{'w13' if shard == 'w1' else 'w2'}_{suffix}"
                p = res["params"][name]
                calls = sorted(p["calls"], key=lambda c: c[1])
                assert [c[:2] for c in calls] == [[shard, e] for e in range(experts)], (fmt, name)
                for e, (_, _, shape) in enumerate(calls):
                    written = list(
                        tensors[f"backbone.layers.{layer}.mixer.experts.{e}.{proj}.{suffix}"].shape
                    )
                    assert shape == written == p["shape"][1:], (fmt, name, shape, written, p["shape"])
    assert got["gptq_dynamic"] is None  # quantized at the base width (False would leave it 16-bit)
    assert got["ct_scheme_bits"] == [4, 4, 4]


def test_vllms_nemotron_h_loader_takes_the_exports(qe):
    """vLLM's own weight mapping and parameter shapes for Nemotron-H's non-gated MoE, on both exports."""
    qconfig, ct = _ct(qe)
    rules = export_gptq.dynamic_rules("model.layers", {LAYER: 4}, 4)
    gptq_config = export_gptq._quantization_config(4, 32, False, rules, "published")
    _check_in_vllm(gptq_config, qconfig, _gptq(qe), ct, E, H, I, LAYER)


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    """A tiny Nemotron-H quantized at symmetric 4 bits (RTN, group 32), exported to GPTQ and compressed-tensors."""
    from moequant import api
    from moequant.arch.tiny import tiny_model
    from moequant.calibration.data import CalibData
    from moequant.config import QuantizeConfig

    tmp = tmp_path_factory.mktemp("nemotron_h")
    model = tiny_model("nemotron_h", seed=0)
    plan = api.make_uniform_plan(model, SPEC)
    data = CalibData(
        torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 4, "ids"
    )
    cfg = QuantizeConfig(progress=False, min_tokens=0)
    api.quantize(model, plan, data, tmp / "mq", cfg, save_dtype=torch.float32)
    experts = {
        int(name.split(".layers.")[1].split(".")[0]): m
        for name, m in model.named_modules()
        if getattr(m, "is_moequant_experts", False)
    }
    gptq = export_gptq.export_gptq(tmp / "mq", tmp / "gptq")
    ct = export_ct.export_compressed_tensors(tmp / "mq", tmp / "ct", scale_dtype=torch.float32)
    return experts, gptq, ct


def _folder(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(f).items()}


def test_whole_nemotron_h_checkpoint_exports(nemotron):
    """Every MoE layer of a quantized Nemotron-H: up_proj and down_proj per expert under the published names, equal
    to the quantized model's experts (GPTQ by the v1 dequantizer, compressed-tensors by the library); every other
    tensor under its published name."""
    experts, gptq_dir, ct_dir = nemotron
    assert experts and all(not qe.activation.gated for qe in experts.values())
    gptq, ct = _folder(gptq_dir), _folder(ct_dir)
    decompressed = export_ct.decompressed_state_dict(ct_dir)
    for tensors in (gptq, ct):
        assert all(k.startswith(("backbone.", "lm_head.")) for k in tensors), sorted(tensors)[:5]
        assert not any(".gate_proj." in k or ".gate_up" in k for k in tensors)
    for i, qe in experts.items():
        for e in range(qe.num_experts):
            stem = f"backbone.layers.{i}.mixer.experts.{e}"
            up, down = qe.slot(e).gate_up, qe.slot(e).down
            assert torch.equal(_dequant_v1(gptq, f"{stem}.up_proj"), up.dequantize(torch.float64))
            assert torch.equal(_dequant_v1(gptq, f"{stem}.down_proj"), down.dequantize(torch.float64))
            assert torch.equal(decompressed[f"{stem}.up_proj.weight"], up.dequantize(torch.float32))
            assert torch.equal(decompressed[f"{stem}.down_proj.weight"], down.dequantize(torch.float32))


def test_vllm_takes_the_whole_nemotron_h_exports(nemotron):
    """vLLM's code on the first MoE layer of both exported folders, under their own config.json."""
    experts, gptq_dir, ct_dir = nemotron
    gptq, ct = _folder(gptq_dir), _folder(ct_dir)
    i = min(experts)
    qe = experts[i]
    layer_of = lambda t: {k: v for k, v in t.items() if k.startswith(f"backbone.layers.{i}.mixer.experts.")}  # noqa: E731
    config = json.loads((gptq_dir / "config.json").read_text())
    gptq_config = config["quantization_config"]
    ct_config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    _check_in_vllm(gptq_config, ct_config, layer_of(gptq), layer_of(ct), qe.num_experts, qe.hidden,
                   qe.intermediate, i, config["mlp_hidden_act"])  # fmt: skip
