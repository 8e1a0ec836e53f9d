"""moequant: per-expert mixed-precision quantization for Mixture-of-Experts checkpoints.

`import moequant` registers the "moequant" quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads moequant checkpoints.
"""

import os

# scipy's OpenBLAS (GPTQ's factorisations, quantizers/gptq_factor.py) reads this once, when it loads: its idle
# workers then sleep at once instead of spinning for about 2^28 cycles after every call, which took the cores
# from torch's own threads right after each factorisation (evals/results/blas_spin_2026-12-07.md). Same
# thread counts, same arithmetic; a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from moequant import arch  # noqa: E402, F401  (adapters are derived on demand: arch/derive.py)
from moequant.checkpoint import ct_loading as _ct_loading  # noqa: E402
from moequant.checkpoint import format as _format  # noqa: E402, F401  (registers the quantizer with transformers)
from moequant.errors import MoEQuantError  # noqa: E402

_ct_loading.install()  # compressed-tensors MoE checkpoints with per-expert tensors load right (or are refused)

__version__ = "0.1.0"

__all__ = ["MoEQuantError", "__version__"]
