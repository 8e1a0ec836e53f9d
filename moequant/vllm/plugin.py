"""The `vllm.general_plugins` entry point (pyproject.toml): vLLM calls `register` in every process it starts."""

from __future__ import annotations


def register() -> None:
    """Register the "moequant" quantization config with vLLM. Calling it again registers the same class again,
    which vLLM allows (it adds the name to its list once): vLLM may load plugins more than once."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    from moequant.vllm.quant_config import NAME, MoEQuantVllmConfig

    register_quantization_config(NAME)(MoEQuantVllmConfig)
