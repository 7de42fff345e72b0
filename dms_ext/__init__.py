"""dms_ext: kernels and a paged KV cache for Dynamic Memory Sparsification (DMS)."""
import torch  # noqa: F401  (_C links against libtorch / libc10, which torch loads first)

from . import _C  # noqa: F401  (runs the TORCH_LIBRARY block: torch.ops.dms.*)
from . import ops, reference
from .cache import DecodePlan, DMSCache, OutOfBlocks, RecaptureNeeded

__all__ = ["ops", "reference", "DMSCache", "DecodePlan", "OutOfBlocks", "RecaptureNeeded"]
