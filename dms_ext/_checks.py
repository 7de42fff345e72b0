"""Argument checks of DMSCache (dms_ext/cache.py): each raises ValueError naming the argument."""
from __future__ import annotations

import math
import operator
from typing import List

import numpy as np
import torch

# The pool dtypes a DMSCache takes besides its compute dtype (docs/cache.md).
FP8_DTYPES = (torch.float8_e4m3fn,)


def as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}") from None


def positive(value, name: str) -> int:
    v = as_int(value, name)
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def layer_scales(value, name: str, num_layers: int, fp8: bool) -> List[float]:
    """k_scale / v_scale: a float, or one per layer (list / tuple of num_layers floats); each
    finite and > 0 as a float32, and 1.0 unless the pool is fp8."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"{name}: expected a float or {num_layers} floats (one per layer), "
                         f"got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}: expected a float, got {type(v).__name__}")
        f32 = float(np.float32(v)) if math.isfinite(float(v)) and abs(float(v)) < 3.5e38 else math.inf
        if not (math.isfinite(f32) and f32 > 0):
            raise ValueError(f"{name}: expected a finite float > 0, got {v}")
        if not fp8 and f32 != 1.0:
            raise ValueError(f"{name}: must be 1.0 unless kv_dtype is float8_e4m3fn, got {v}")
        out.append(float(v))
    return out
