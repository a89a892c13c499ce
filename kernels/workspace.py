"""Arrival counters for kernels that finish a split reduction in the last program to arrive.

A split-K GEMV (or split-KV attention) writes fp32 partials; instead of a second reduce launch,
each program bumps a counter for its output tile after storing its partial, and the program that
sees `count == splits - 1` sums the partials in split order (deterministic, one writer per output
element) and resets the counter to 0. So the counters are zero between kernels, and one buffer per
device serves every kernel of a forward pass (kernels on one stream never overlap).

The buffer is allocated (zeroed) outside CUDA-graph capture, by the eager warm-up that precedes
every capture; asking for a larger one while capturing is an error, not a silent allocation that
would be replayed as garbage.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # replaced buffers stay alive: a captured graph may still point at them
MIN_COUNTERS = 1 << 16  # covers a 262k-vocab lm_head at 4 rows per program


def counters(device: torch.device, n: int) -> torch.Tensor:
    """An int32 buffer of at least n zeroed counters on `device` (shared; see the module doc)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"arrival counters: {n} needed during CUDA-graph capture; run the step eagerly first")
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, MIN_COUNTERS, 2 * (buf.numel() if buf is not None else 0)),
                          dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf
