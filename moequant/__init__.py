"""moequant: per-expert mixed-precision quantization for Mixture-of-Experts checkpoints."""

from moequant import arch  # noqa: F401  (registers the families)
from moequant.errors import MoEQuantError

__version__ = "0.1.0"

__all__ = ["MoEQuantError", "__version__"]
