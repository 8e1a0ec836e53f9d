#!/usr/bin/env python
"""Train the bundled tiny MoE (moequant/assets/tiny-moe) on the bundled corpus, on CPU.

1. A byte-level BPE tokenizer (4096 tokens, `<|endoftext|>` as bos/eos/pad) trained on the train split.
2. A MixtralForCausalLM built with from_config: 4 layers, hidden 128, 4 heads (2 KV heads), 8 experts of
   intermediate size 256, top-2, tied embeddings; trained in fp32 with AdamW (warmup + cosine) and the
   router load-balancing loss, on 256-token windows of all six domains in a seeded order.
3. Saved in bfloat16 (safetensors), reloaded from disk, and evaluated in fp32 compute: validation
   perplexity per domain (non-overlapping 256-token windows) and expert routing per domain.
4. training_report.json and README.md written next to the weights.

    python tools/train_tiny_moe.py                 # the committed run (10-25 minutes on 2 shared cores)
    python tools/train_tiny_moe.py --steps 50 --out /tmp/tiny-moe-smoke   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

# Shared 2-core machines: OpenMP threads that spin while waiting make every step several times slower as
# soon as another process runs; passive waiting keeps the same results (same thread count) at a small cost.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # routing_by_domain.py beside this file

from routing_by_domain import format_table, routing_by_domain  # noqa: E402

from moequant.calibration.corpus import DOMAINS, load_split  # noqa: E402

DEFAULT_OUT = REPO / "moequant" / "assets" / "tiny-moe"
SPECIAL = "<|endoftext|>"


def train_tokenizer(vocab_size: int):
    """Byte-level BPE on the train split of every domain; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = load_split("train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )

    def blocks():
        for text in texts.values():
            for block in text.split("\n\n"):
                yield block + "\n\n"

    tok.train_from_iterator(blocks(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=512,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
    )


def encode_split(tokenizer, split: str) -> dict[str, torch.Tensor]:
    return {
        d: torch.tensor(
            tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
        )
        for d, text in load_split(split).items()
    }


def windows(ids: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping full windows `[n, seq_len]` of a token stream, starting at `offset`."""
    ids = ids[offset:]
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


class WindowStream:
    """Seeded, deterministic order of training windows: every epoch each domain's stream is cut at a fresh
    random offset into seq_len windows, and the windows of all domains are shuffled together."""

    def __init__(self, streams: dict[str, torch.Tensor], seq_len: int, seed: int):
        self.streams, self.seq_len, self.seed = streams, seq_len, seed
        self.epoch, self.pos, self.order = -1, 0, None
        self.tokens_per_epoch = sum(len(s) for s in streams.values())

    def _new_epoch(self) -> None:
        self.epoch += 1
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        parts = []
        for name in sorted(self.streams):
            offset = int(torch.randint(0, self.seq_len, (1,), generator=g)) if self.epoch else 0
            parts.append(windows(self.streams[name], self.seq_len, offset))
        data = torch.cat(parts)
        self.order = data[torch.randperm(len(data), generator=g)]
        self.pos = 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        if self.order is None or self.pos + batch_size > len(self.order):
            self._new_epoch()
        batch = self.order[self.pos : self.pos + batch_size]
        self.pos += batch_size
        return batch


def build_model(args, tokenizer):
    from transformers import AutoModelForCausalLM, MixtralConfig

    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # halves the embedding bytes of a 4096 x 128 vocabulary
        output_router_logits=True,  # adds router_aux_loss_coef * load-balancing loss to the LM loss
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model, wins: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, dict]:
    """Token-level perplexity per domain and overall; every window is scored on its own (the first token of
    a window is context only)."""
    model.eval()
    out, total_nll, total_tok = {}, 0.0, 0
    for domain, w in wins.items():
        nll, count = 0.0, 0
        for i in range(0, len(w), batch_size):
            x = w[i : i + batch_size]
            logits = model(input_ids=x, output_router_logits=False).logits.float()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += x[:, 1:].numel()
        out[domain] = {"ppl": math.exp(nll / count), "tokens": count, "windows": len(w)}
        total_nll += nll
        total_tok += count
    out["overall"] = {"ppl": math.exp(total_nll / total_tok), "tokens": total_tok}
    return out


def machine_description() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--readme-only", action="store_true", help="re-render README.md from training_report.json"
    )
    args = ap.parse_args()
    if args.readme_only:
        report = json.loads((args.out / "training_report.json").read_text())
        (args.out / "README.md").write_text(render_readme(report), encoding="utf-8")
        return

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(args.vocab)
    tokenizer.save_pretrained(args.out)
    train_ids = encode_split(tokenizer, "train")
    val_ids = encode_split(tokenizer, "validation")
    val_wins = {d: windows(ids, args.seq_len) for d, ids in val_ids.items()}
    monitor_wins = {d: w[:: max(1, len(w) // 8)][:8] for d, w in val_wins.items()}  # 8 spread windows each
    print(
        f"tokenizer: {len(tokenizer)} tokens; train tokens "
        + ", ".join(f"{d} {len(v):,d}" for d, v in train_ids.items()),
        flush=True,
    )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__} {n_params:,d} parameters", flush=True)
    baseline = perplexity(model, {d: w[:4] for d, w in val_wins.items()})  # random init, 4 windows/domain
    print(
        "random-init ppl (4 windows/domain): "
        + ", ".join(f"{d} {v['ppl']:.0f}" for d, v in baseline.items()),
        flush=True,
    )

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    stream = WindowStream(train_ids, args.seq_len, args.seed)
    history, recent = [], []
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = stream.next_batch(args.batch_size)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux_loss = out.aux_loss.item()
        lm_loss = out.loss.item() - args.aux_coef * aux_loss
        recent.append((lm_loss, aux_loss))
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            lm = sum(r[0] for r in recent) / len(recent)
            aux = sum(r[1] for r in recent) / len(recent)
            elapsed = time.time() - t_train
            row = {
                "step": step + 1,
                "lm_loss": round(lm, 4),
                "aux_loss": round(aux, 4),
                "lr": lr_at(step, args),
                "grad_norm": round(grad_norm, 3),
                "elapsed_s": round(elapsed, 1),
            }
            if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
                row["val_ppl_monitor"] = round(perplexity(model, monitor_wins)["overall"]["ppl"], 2)
                model.train()
            history.append(row)
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(
                f"step {step + 1:5d}/{args.steps} lm {lm:.4f} aux {aux:.4f} lr {row['lr']:.2e} "
                f"gnorm {grad_norm:.2f} {elapsed:6.0f}s eta {eta:5.0f}s"
                + (f" val~ppl {row['val_ppl_monitor']}" if "val_ppl_monitor" in row else ""),
                flush=True,
            )
            recent = []
    train_seconds = time.time() - t_train
    final_train_loss = history[-1]["lm_loss"]

    # fp32 weights as trained, then the bf16 weights users get
    fp32_ppl = perplexity(model, val_wins)
    model.to(torch.bfloat16)
    model.config.output_router_logits = False  # users' default: no router logits, no aux term in outputs.loss
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(args.out)
    del model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(
        args.out, dtype=torch.float32
    )  # bf16 on disk -> fp32 compute
    val_wins = {d: windows(ids, args.seq_len) for d, ids in encode_split(tokenizer, "validation").items()}
    bf16_ppl = perplexity(model, val_wins)
    routing = routing_by_domain(model, val_wins)
    wall = time.time() - t_start

    weights = args.out / "model.safetensors"
    report = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "wall_time_s": round(wall, 1),
        "train_time_s": round(train_seconds, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {
            "class": type(model).__name__,
            "model_type": model.config.model_type,
            "parameters": n_params,
            "num_experts": model.config.num_local_experts,
            "top_k": model.config.num_experts_per_tok,
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "intermediate_size": model.config.intermediate_size,
            "vocab_size": model.config.vocab_size,
            "tie_word_embeddings": model.config.tie_word_embeddings,
            "dtype_on_disk": "bfloat16",
            "safetensors_bytes": weights.stat().st_size,
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "special_tokens": [SPECIAL]},
        "data": {
            "corpus": "calibration/corpus (see SOURCES.md)",
            "domains": list(DOMAINS),
            "train_tokens": {d: len(v) for d, v in train_ids.items()},
            "seq_len": args.seq_len,
            "epochs_seen": round(args.steps * args.batch_size * args.seq_len / stream.tokens_per_epoch, 2),
        },
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "final_train_loss": final_train_loss,
        "val_perplexity_bf16": {d: round(v["ppl"], 3) for d, v in bf16_ppl.items()},
        "val_perplexity_fp32_before_bf16": {d: round(v["ppl"], 3) for d, v in fp32_ppl.items()},
        "val_tokens_scored": {d: v["tokens"] for d, v in bf16_ppl.items()},
        "random_init_perplexity_4_windows": {d: round(v["ppl"], 1) for d, v in baseline.items()},
        "perplexity_method": (
            f"token-level exp(mean NLL) over non-overlapping {args.seq_len}-token windows of each domain's "
            "validation text (tail shorter than a window dropped), fp32 compute from the saved bf16 weights"
        ),
        "routing_by_domain": routing,
        "history": history,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (args.out / "README.md").write_text(render_readme(report), encoding="utf-8")

    print("\nvalidation perplexity (bf16 weights, fp32 compute):")
    for d, v in bf16_ppl.items():
        print(f"  {d:8s} {v['ppl']:8.3f}   (fp32 before rounding {fp32_ppl[d]['ppl']:.3f})")
    print("\nrouting by domain (validation):\n" + format_table(routing))
    print(f"\nsafetensors {weights.stat().st_size:,d} bytes; train {train_seconds:.0f}s; wall {wall:.0f}s")


def render_readme(r: dict) -> str:
    m = r["model"]
    ppl = r["val_perplexity_bf16"]
    rows = "\n".join(f"| {d} | {ppl[d]:.2f} | {r['random_init_perplexity_4_windows'][d]:.0f} |" for d in ppl)
    rarely = [
        f"layer {x['layer']} expert {e} ({100 * f:.2f}%)"
        for x in r["routing_by_domain"]["layers"]
        for e, f in enumerate(x["mixture_load"])
        if f < 0.02
    ]
    jsd = "\n".join(
        f"| {x['layer']} | {x['jsd_mean_between_domains']:.3f} | {x['jsd_mean_within_domain_halves']:.3f} | "
        f"{max(x['jsd_pairwise'].items(), key=lambda kv: kv[1])[0].replace('|', ' vs ')} | "
        f"{x['mixture_load_entropy_bits']:.2f} |"
        for x in r["routing_by_domain"]["layers"]
    )
    return f"""# tiny-moe: the bundled, trained toy Mixture-of-Experts

A small `{m["class"]}` (transformers `model_type: {m["model_type"]}`) trained from scratch on CPU on the
bundled six-domain corpus, so that tests, demos and benchmarks have a real, trained MoE offline.
Not a useful language model: its purpose is routing that differs between domains and weights whose
quantization damage can be measured.

- {m["layers"]} layers, hidden {m["hidden_size"]}, 4 attention heads (2 KV heads), {m["num_experts"]} experts of
  intermediate size {m["intermediate_size"]} per layer, top-{m["top_k"]} routing, tied embeddings
- {m["parameters"]:,d} parameters, stored in bfloat16: `model.safetensors` is {m["safetensors_bytes"]:,d} bytes
- tokenizer: byte-level BPE, {r["tokenizer"]["vocab_size"]} tokens, `<|endoftext|>` is bos/eos/pad
- trained {r["steps"]} steps x {r["batch_size"]} x {r["data"]["seq_len"]} tokens = {r["tokens_seen"]:,d} tokens
  (~{r["data"]["epochs_seen"]} epochs), AdamW + warmup/cosine, router load-balancing loss coefficient
  {r["args"]["aux_coef"]}; {r["train_time_s"] / 60:.1f} min of training, {r["wall_time_s"] / 60:.1f} min wall in all
  on {r["machine"]["cores"]} CPU cores ({r["machine"]["cpu"]}), {r["date_utc"][:10]}

```
moequant.checkpoint.bundled.bundled_model_path()          # this folder; "moequant/tiny-moe" is its pseudo-id
transformers.AutoModelForCausalLM.from_pretrained("moequant/assets/tiny-moe")
```

## Validation perplexity (saved bf16 weights, fp32 compute)

Token-level, non-overlapping {r["data"]["seq_len"]}-token windows of each domain's validation split.

| domain | perplexity | random init |
|---|---|---|
{rows}

## Routing differs between domains

Jensen-Shannon divergence (bits, 0..1) between the domains' expert-load distributions (fraction of routed
token slots per expert) on the validation split, per layer: mean over the 15 domain pairs, against the
noise floor of the same measure between the two halves of one domain's text.

| layer | JSD between domains | JSD within a domain | most distinct pair | load entropy (bits, max 3) |
|---|---|---|---|---|
{jsd}

Full per-expert loads are in `training_report.json` (`routing_by_domain`); recompute with
`python tools/routing_by_domain.py`. Experts receiving under 2% of the routed slots (all domains
together): {", ".join(rarely) or "none"}. Such rarely used experts are realistic and exercise the
quantizer's low-coverage paths; the load-balancing coefficient is {r["args"]["aux_coef"]} because a 900-step run with 0.01
left five experts (up to two per layer) almost unused.

## Reproduce

```
{r["command"]}
```

The corpus is `calibration/corpus/` (rebuilt by `tools/build_corpus.py`; sources and licences in
`calibration/corpus/SOURCES.md`). Training is seeded and its data order deterministic.

## Licence

The weights and tokenizer are released under the project's licence (Apache-2.0). They are trained on
public-domain texts (Jane Austen), the Python standard library (PSF licence), and Debian-packaged texts
under GPL-2+ or free terms (French Debian manuals, fortunes-de/es/it); see `calibration/corpus/SOURCES.md`.
"""


if __name__ == "__main__":
    main()
