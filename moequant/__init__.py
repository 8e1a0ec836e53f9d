"""moequant: per-expert mixed-precision quantization for Mixture-of-Experts checkpoints.

`import moequant` registers the "moequant" quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads moequant checkpoints.
"""

from moequant import arch  # noqa: F401  (adapters are derived on demand: arch/derive.py)
from moequant.checkpoint import ct_loading as _ct_loading
from moequant.checkpoint import format as _format  # noqa: F401  (registers the quantizer with transformers)
from moequant.errors import MoEQuantError

_ct_loading.install()  # compressed-tensors MoE checkpoints with per-expert tensors load right (or are refused)

__version__ = "0.1.0"

__all__ = ["MoEQuantError", "__version__"]
