"""Run by the tests with vLLM's Python: load a moequant checkpoint with vLLM (the plugin comes in through its entry
point) and write what vLLM holds and computes to OUT: dump.safetensors (every expert's storage tensor as
`<layer>.<expert>.<proj>.<tensor>`, the probe input and each expert's output on it through the plugin's routed
sum) and dump.json (each expert's storage labels, prompt NLLs, vLLM's version).

    python vllm_child.py CHECKPOINT OUT
"""

import json
import sys
from pathlib import Path

PROMPTS = [
    [1, 415, 293, 906, 285, 114, 287, 740, 750] * 4,
    [1, 330, 248, 302, 272, 526] * 6,
]  # token ids, tiny vocab
PROBE_TOKENS = 5


def dump(model):
    import torch

    from moequant.config import spec_label
    from moequant.vllm.store import stores_of

    tensors, labels = {}, {}
    g = torch.Generator().manual_seed(0)
    for layer, store in sorted(stores_of(model).items()):
        qe = store.experts
        labels[str(layer)] = [spec_label(s) for s in qe.specs]
        for key, t in qe.state_dict().items():
            tensors[f"{layer}.{key}"] = t.detach().cpu().clone()
        x = torch.randn(PROBE_TOKENS, qe.hidden, generator=g)  # [T, H] float32
        tensors[f"{layer}.probe_input"] = x
        for e in range(qe.num_experts):
            ids = torch.full((PROBE_TOKENS, 1), e, dtype=torch.int32)  # [T, 1]: every token to expert e
            w = torch.ones(PROBE_TOKENS, 1)  # [T, 1]
            tensors[f"{layer}.probe_output.{e}"] = store(x, ids, w).detach().cpu()  # [T, H]
    return tensors, labels


def main(checkpoint: str, out: str) -> None:
    import vllm
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256,
              seed=0)  # fmt: skip
    ((tensors, labels),) = llm.apply_model(dump)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    nll = [-sum(d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True))
           for p, o in zip(PROMPTS, outs, strict=True)]  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out) / "dump.safetensors"))
    record = {"labels": labels, "prompts": PROMPTS, "nll": nll, "vllm": vllm.__version__}
    (Path(out) / "dump.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:3])
