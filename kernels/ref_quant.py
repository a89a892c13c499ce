"""Torch dequantization of GGUF blocks (CPU path and test oracle).

Placeholder until the vectorized torch version lands: delegates to gguf.quants (numpy).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _np_dequantize


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw: uint8 [rows, bytes_per_row] blocks -> dense `dtype` tensor of logical `shape`."""
    arr = _np_dequantize(raw.cpu().numpy(), GGMLQuantizationType(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(arr)).reshape(shape).to(dtype)
