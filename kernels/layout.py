"""Host-side tensor layout helpers shared by the row-wise kernels (norm, act)."""

from __future__ import annotations

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [R, H] without a copy where the layout allows (last dim contiguous, rows evenly strided)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.contiguous().view(-1, t.shape[-1])
