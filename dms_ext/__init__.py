"""dms_ext: kernels and a paged KV cache for Dynamic Memory Sparsification (DMS)."""
import torch  # noqa: F401  (_C links against libtorch / libc10, which torch loads first)

from . import _C  # noqa: F401  (runs the TORCH_LIBRARY block: torch.ops.dms.*)
from . import ops, reference
from .cache import DecodePlan, DMSCache, OutOfBlocks, RecaptureNeeded
from . import fp8  # noqa: E402  (per-layer fp8 scales for DMSCache; imports .cache)

__all__ = ["ops", "reference", "fp8", "DMSCache", "DecodePlan", "OutOfBlocks", "RecaptureNeeded"]
