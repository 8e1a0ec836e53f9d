"""Adapters derived from the model itself: no file per family.

transformers 5 marks every fused experts class with its experts interface (`use_experts_implementation`
gives each instance `has_gate`, `is_transposed`, `is_concatenated`, ... and a `forward(hidden_states,
top_k_index, top_k_weights)`). From a loaded model (weights on the meta device are fine) this module finds

- the structure, from module names: the decoder-layer list, the block holding the experts, the experts;
- everything a family's code decides, by running a tiny random twin of the model (its own config, shrunk:
  shrink.shrink_config) on a probe batch:
  - the router: the block's child whose output holds a [T, E] tensor, the first one called;
  - router facts: top-k from the `top_k_index` the experts receive, and the scoring (softmax or sigmoid,
    renormalised or not, a constant scale) that reproduces the `top_k_weights` from the router's logits;
  - the fused layout (transposed or not, gate/up concatenated or interleaved) and the activation: the
    canonical view (base.py) under each candidate must reproduce the experts module's own output, expert
    by expert; an activation none of ours matches runs as the family's own gate function (Activation.MODULE);
- shared experts and small gating Linears: the block's other children.

Experts without a gate projection (the interface's has_gate False: `up_proj` alone) derive a non-gated
activation (Activation.RELU2, else the family's own act_fn: MODULE_UNGATED). Families whose experts do not
follow the interface, or that the canonical view cannot express (a norm after each expert inside the experts
module), raise UnsupportedModelError saying why.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from dataclasses import replace

import torch

from moequant.arch.base import (
    Activation,
    ExpertLayout,
    MoEArch,
    RouterFacts,
    Routing,
    expert_forward,
    experts_call_args,
    flat_tensors,
)
from moequant.arch.registry import conform
from moequant.arch.shrink import shrink_config
from moequant.errors import NoMoEError, UnsupportedModelError

logger = logging.getLogger(__name__)

# nn.Module's own parameter/buffer registration, saved at import: from_pretrained builds models inside a context
# that patches them to put every new tensor on the meta device, and the twin must be real even then
_REGISTER = (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer)

INTERFACE_ATTRS = ("has_gate", "is_transposed", "is_concatenated")  # what use_experts_implementation sets
_SWIGLU_ATTRS = (("alpha", "limit"), ("swiglu_alpha", "swiglu_limit"))


def is_experts_module(module: torch.nn.Module) -> bool:
    """A fused experts module of transformers' experts interface."""
    if getattr(module, "is_moequant_experts", False):
        return True  # already quantized (modules/qexperts.py): same place, same adapter
    down = getattr(module, "down_proj", None)
    return (
        all(hasattr(module, a) for a in INTERFACE_ATTRS)
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
    )


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path) if path else root


def find_structure(model: torch.nn.Module) -> tuple[str, str, str]:
    """(decoder-layer list, block within a layer, experts within the block) paths, from where the experts
    modules sit (after its family file, if any, made them follow the interface: registry.conform). Raises
    NoMoEError when the model has none."""
    conform(model)
    names = [n for n, m in model.named_modules() if is_experts_module(m)]
    if not names:
        others = [n for n, _ in model.named_modules() if n.endswith("experts")]
        if others:
            raise UnsupportedModelError(
                f"{type(model).__name__} has experts modules ({others[0]}, ...) that do not follow transformers' "
                "fused experts interface (use_experts_implementation); moequant derives adapters from it"
            )
        raise NoMoEError(
            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}) has no "
            "Mixture-of-Experts blocks; moequant quantizes MoE models"
        )
    found = Counter()
    for n in names:
        m = re.fullmatch(r"(.+?)\.(\d+)\.(.+)", n)
        if m is None:
            raise UnsupportedModelError(f"experts module {n} is not inside a list of decoder layers")
        layers, rest = m.group(1), m.group(3)
        block, _, experts = rest.rpartition(".")
        found[(layers, block, experts)] += 1
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} keeps experts at several places ({', '.join('.'.join(k) for k in found)}); "
            "moequant handles one experts position per decoder layer"
        )
    return next(iter(found))


def _in_proj_name(experts: torch.nn.Module) -> str:
    """The experts module's input projection parameter, as transformers' interface names it: `gate_up_proj`,
    or `up_proj` where the interface says the experts have no gate (has_gate False)."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def _check_expressible(experts: torch.nn.Module) -> None:
    name = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{name}: a norm after each expert is not expressible in moequant's canonical view"
        )
    param = _in_proj_name(experts)
    if not isinstance(getattr(experts, param, None), torch.Tensor):
        raise UnsupportedModelError(f"{name}: no fused {param} parameter")


# ---- the twin and its probe -------------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_float32():
    """The twin and its probes are float32 on the CPU, whatever the caller's context: from_pretrained builds the
    model under a meta device and its own default dtype (bfloat16 for most checkpoints), and a probe input
    made in that dtype would not match the float32 twin."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(saved)


def tiny_twin(model_or_config) -> torch.nn.Module:
    """A tiny random model of the same class (a model given) or of the config's CausalLM, from the shrunk config,
    with routers and experts given non-degenerate random weights: float32, on the CPU, also when called while a
    model loads (from_pretrained's meta device and default dtype)."""
    with _cpu_float32():
        return _tiny_twin(model_or_config)


def _tiny_twin(model_or_config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = getattr(model_or_config, "config", model_or_config)
    small = shrink_config(config)
    if hasattr(small, "quantization_config"):
        del small.quantization_config
    gen = torch.Generator().manual_seed(0)
    patched = (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer)
    torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = _REGISTER
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if isinstance(model_or_config, torch.nn.Module):
                twin = type(model_or_config)._from_config(small, dtype=torch.float32)
            else:
                twin = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
    finally:
        torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = patched
    conform(twin)
    twin.eval()
    with torch.no_grad():
        for block in list(twin.modules()):
            for experts in [c for c in block.children() if is_experts_module(c)]:
                num = experts.down_proj.shape[0]
                for p in experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                for c in block.children():
                    for p in c.parameters() if c is not experts else ():
                        if p.dim() == 2 and p.shape[0] == num:  # router-like: one row per expert
                            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return twin


class _Probe:
    """One forward of the twin on a probe batch, recording each MoE block's experts call and its children's
    outputs (in call order)."""

    def __init__(self, twin, layers: str, block: str, experts: str):
        self.calls: dict[
            int, tuple
        ] = {}  # layer -> (hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
        self.children: dict[int, list[tuple[str, object]]] = {}  # layer -> [(child name, output)]
        handles = []
        for i, layer in enumerate(twin.get_submodule(layers)):
            try:
                blk = _get(layer, block)
                exp = getattr(blk, experts)
            except AttributeError:
                continue
            if not is_experts_module(exp):
                continue
            handles.append(exp.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            for name, child in blk.named_children():
                if child is not exp:
                    handles.append(child.register_forward_hook(self._post(i, name)))
        vocab = twin.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                twin(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def _pre(self, i):
        def hook(_m, args, kwargs):
            h, idx, w = experts_call_args(args, kwargs)
            h = h.detach().float().reshape(-1, h.shape[-1])  # [T, H]
            rows = (h.shape[0], -1)
            self.calls.setdefault(i, (h, idx.detach().reshape(rows), w.detach().float().reshape(rows)))

        return hook

    def _post(self, i, name):
        def hook(_m, _args, out):
            self.children.setdefault(i, []).append((name, out))

        return hook


def _router_and_logits(
    children, idx: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> tuple[str, torch.Tensor, RouterFacts]:
    """(child, [tokens, C] logits, router facts) of the MoE block's router, from its children's outputs in call
    order (the experts got `idx` / `weights` [tokens, k]):

    - the first output of [tokens, experts] logits; else one whose rows the experts receive several times, slot by
      slot (a conformed block hands each token once per routing slot), repeated;
    - else an output of [tokens, C > experts] whose scoring reproduces the routed weights: a router with classes
      beyond the experts that route nowhere (a slot choosing one reaches the experts with weight 0, its index
      masked to some expert's). Other outputs of that size (hidden states a router hands on) reproduce nothing."""
    tokens = idx.shape[0]
    outs = [(n, at, t) for n, out in children for at, t in enumerate(flat_tensors(out))]
    outs = [(n, at, t.detach().float()) for n, at, t in outs if t.is_floating_point() and t.dim() >= 2]
    exact = [(n, at, t) for n, at, t in outs if t.shape[-1] == num_experts]
    for name, at, t in exact:
        if t.numel() == tokens * num_experts:
            logits = t.reshape(tokens, num_experts)  # [T, E]
            return name, logits, replace(router_facts(logits, idx, weights), logits_at=at)
    for name, at, t in exact:
        rows = t.numel() // num_experts
        if 0 < rows < tokens and tokens % rows == 0:
            logits = t.reshape(rows, num_experts).repeat(tokens // rows, 1)  # [T, E]
            return name, logits, replace(router_facts(logits, idx, weights), logits_at=at)
    for name, at, t in outs:
        classes = t.shape[-1]
        if classes <= num_experts or t.numel() != tokens * classes:
            continue
        logits = t.reshape(tokens, classes)  # [T, C]
        facts = router_facts(logits, idx, weights)
        if facts.scoring != "unknown":
            return name, logits, replace(facts, extra_classes=classes - num_experts, logits_at=at)
    raise UnsupportedModelError("no child of the MoE block outputs [tokens, experts] router logits")


def router_facts(logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> RouterFacts:
    """The scoring that reproduces the routed weights [T, k] from the logits [T, C] (C: the experts, and any classes
    beyond them) at the chosen experts. Slots of weight exactly 0 are not compared: they route nowhere (a family
    masks a slot that chose a class without an expert to some expert's index, weight 0), and a renormalised
    router's k weights sum to one over the slots that route."""
    k = idx.shape[-1]
    routed = weights != 0  # [T, k]
    if not routed.any():
        return RouterFacts(top_k=k, scoring="unknown", renormalized=False)
    for scoring, scores in (("softmax", logits.softmax(-1)), ("sigmoid", logits.sigmoid())):
        g = scores.gather(-1, idx) * routed  # [T, k], 0 where the slot routes nowhere
        for renorm in (False, True):
            c = g / g.sum(-1, keepdim=True).clamp_min(1e-12) if renorm else g
            scale = float((weights[routed] / c[routed].clamp_min(1e-12)).mean())
            if torch.allclose(weights, c * scale, rtol=1e-4, atol=1e-6):
                return RouterFacts(top_k=k, scoring=scoring, renormalized=renorm and k > 1, scale=scale)
    return RouterFacts(top_k=k, scoring="unknown", renormalized=False)


def _swiglu_attrs(experts) -> tuple[str, str] | None:
    for pair in _SWIGLU_ATTRS:
        if all(isinstance(getattr(experts, a, None), int | float) for a in pair):
            return pair
    return None


def probe_layout(experts: torch.nn.Module, hidden: int) -> tuple[ExpertLayout, Activation, tuple | None]:
    """(layout, activation, SwiGLU attribute names) under which the canonical view reproduces `experts`'s own
    output for its first and last expert on random inputs (called by derive_arch, on the CPU)."""
    _check_expressible(experts)
    param = _in_proj_name(experts)
    has_bias = isinstance(getattr(experts, f"{param}_bias", None), torch.Tensor)
    num = experts.down_proj.shape[0]
    gu_shape = tuple(getattr(experts, param).shape)
    attrs = _swiglu_attrs(experts)
    # the canonical activations of the interface's kind: [gate; up] ones, or up alone (has_gate False)
    acts = (
        (Activation.SILU_GLU, Activation.GPT_OSS_SWIGLU, Activation.MODULE)
        if experts.has_gate
        else (Activation.RELU2, Activation.MODULE_UNGATED)
    )
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, hidden, generator=gen) * 3  # [T, H]
    ones = torch.ones(6, 1)
    with torch.no_grad():
        refs = {e: experts(x, torch.full((6, 1), e, dtype=torch.long), ones).float() for e in (0, num - 1)}
    found = []
    for layout in ExpertLayout:
        if (gu_shape[1] if layout.transposed else gu_shape[2]) != hidden:
            continue
        if layout.interleaved and not experts.has_gate:
            continue  # up alone has nothing to interleave
        for act in acts:
            if act is Activation.GPT_OSS_SWIGLU and attrs is None:
                continue
            arch = MoEArch("probe", layout=layout, activation=act, has_bias=has_bias, act_attrs=attrs)
            w, params = arch.expert_weights(experts), arch.activation_params(experts)
            with torch.no_grad():
                ok = all(
                    torch.allclose(expert_forward(w, e, x, act, params), ref, rtol=1e-4, atol=1e-5)
                    for e, ref in refs.items()
                )
            if ok:
                found.append((layout, act))
    known = [f for f in found if not f[1].own_function]
    if known:
        return known[0][0], known[0][1], attrs if known[0][1] is Activation.GPT_OSS_SWIGLU else None
    # the family's own gate cannot tell [gate; up] from interleaved rows: the interface's flag does
    flagged = [f for f in found if f[0].interleaved == (experts.has_gate and not experts.is_concatenated)]
    if flagged:
        return flagged[0][0], flagged[0][1], None
    raise UnsupportedModelError(
        f"{type(experts).__name__}: no layout of moequant's canonical view reproduces the experts' own output"
    )


# ---- the adapter -------------------------------------------------------------------------------------------


def _final_norm(model, layers: str) -> str:
    parent = layers.rpartition(".")[0]
    for cand in (f"{parent}.norm" if parent else "norm", f"{parent}.final_layernorm", f"{parent}.ln_f"):
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    return f"{parent}.norm"


def _lm_head(model) -> str:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if m is out:
            return name
    return "lm_head"


def derive_arch(model: torch.nn.Module, twin: torch.nn.Module | None = None) -> MoEArch:
    """The adapter of `model` (see module docstring). `twin`: a tiny model of the same class to probe (built from
    the model's config when not given). Runs on the CPU in float32 whatever device and default dtype the
    caller is in."""
    with _cpu_float32():
        return _derive(model, twin)


def _derive(model: torch.nn.Module, twin: torch.nn.Module | None) -> MoEArch:
    layers, block, experts_attr = find_structure(model)
    twin = twin if twin is not None else tiny_twin(model)
    t_layers, t_block, t_experts = find_structure(twin)
    if (t_layers, t_block, t_experts) != (layers, block, experts_attr):
        raise UnsupportedModelError("the tiny twin of the model keeps its experts elsewhere than the model")
    probe = _Probe(twin, layers, block, experts_attr)
    if not probe.calls:
        raise UnsupportedModelError("the probe batch reached no experts module of the tiny twin")
    i = min(probe.calls)
    hidden, idx, weights = probe.calls[i]
    blk = _get(twin.get_submodule(layers)[i], block)
    exp = getattr(blk, experts_attr)
    num = exp.down_proj.shape[0]
    try:
        router, _logits, facts = _router_and_logits(probe.children.get(i, []), idx, weights, num)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{type(model).__name__}: {err}") from None
    layout, activation, attrs = probe_layout(exp, hidden.shape[-1])
    shared, gates = [], []
    for name, child in blk.named_children():
        if child is exp or name == router or not any(True for _ in child.parameters()):
            continue
        if block == "" and (name.endswith("attn") or "norm" in name or "attention" in name):
            continue  # the decoder layer itself is the block: only the MoE parts count
        if isinstance(child, torch.nn.Linear) and child.out_features == 1:
            gates.append(name)
        shared.append(name)
    return MoEArch(
        model_type=getattr(model.config, "model_type", type(model).__name__),
        layers=layers,
        block=block,
        router=router,
        experts=experts_attr,
        routing=Routing.SIGMOID_GROUP_TOPK if facts.scoring == "sigmoid" else Routing.SOFTMAX_TOPK,
        layout=layout,
        activation=activation,
        has_bias=isinstance(getattr(exp, f"{_in_proj_name(exp)}_bias", None), torch.Tensor),
        shared=tuple(shared),
        gates=tuple(gates),
        final_norm=_final_norm(model, layers),
        lm_head=_lm_head(model),
        router_facts=facts,
        experts_class=type(exp).__name__,
        act_attrs=attrs,
    )
