"""`moequant export-gptq` / `export-compressed-tensors`: a moequant checkpoint whose MoE layers each hold one
symmetric 4- or 8-bit width, as GPTQ v1 (vLLM, GPTQModel; layers of different widths only with
--allow-mixed-gptq) or compressed-tensors pack-quantized (vLLM, SGLang)."""

from __future__ import annotations

from moequant.cli.common import add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-gptq", help="convert a moequant checkpoint to GPTQ v1 (uniform symmetric 4/8-bit layers)"
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--names", choices=("published", "transformers"), default="published",
        help="expert key names: published (the family's checkpoints, what vLLM loads; default) or transformers "
        "(transformers 5 module names, per-expert gate_proj/up_proj/down_proj: what GPTQModel 7.6 loads)",
    )  # fmt: skip
    p.add_argument(
        "--allow-mixed-gptq", action="store_true",
        help="export even when MoE layers hold different widths, which vLLM's Marlin MoE crashes on "
        "(vllm-project/vllm#41955; default: refused, use export-compressed-tensors)",
    )  # fmt: skip
    add_common(p)
    p.set_defaults(func=run)
    c = sub.add_parser(
        "export-compressed-tensors",
        help="convert a moequant checkpoint to compressed-tensors pack-quantized (one 4/8-bit width per layer)",
    )
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument(
        "--scale-dtype", choices=("float16", "float32"), default="float16",
        help="dtype of weight_scale: float16 (moequant's scales as they are; default) or float32 (the same values, "
        "so the library's dequantization reproduces moequant's float32 weights bit for bit)",
    )  # fmt: skip
    add_common(c)
    c.set_defaults(func=run_ct)


def run(args) -> int:
    from moequant.checkpoint.export_gptq import export_gptq

    path = export_gptq(
        args.src, args.out, overwrite=args.overwrite, names=args.names, allow_mixed=args.allow_mixed_gptq
    )
    print(f"exported GPTQ v1 checkpoint -> {path}")  # noqa: T201
    return 0


def run_ct(args) -> int:
    import torch

    from moequant.checkpoint.export_ct import export_compressed_tensors

    path = export_compressed_tensors(
        args.src, args.out, overwrite=args.overwrite, scale_dtype=getattr(torch, args.scale_dtype)
    )
    print(f"exported compressed-tensors checkpoint -> {path}")  # noqa: T201
    return 0
