"""Quantize float matrices at load into GGUF blocks (`--quantize q8_0|q4_k`), vectorized in torch.

A Hugging Face checkpoint quantized here is a QuantTensor like any GGUF weight, so every backend
path (the Triton kernels' packed planes, the CPU kernels) is reused unchanged and VRAM/RAM holds
about 1.06 (Q8_0) or 0.56 (Q4_K) bytes per weight instead of 2.

- Q8_0: per 32 weights d = max|x| / 127, q = round(x / d): bit-identical to gguf.quants' reference.
- Q4_K: per 32 weights a scale and a minimum over the range [min(0, x), max x] in 15 steps; both
  quantized to 6 bits against the super-block's f16 d and dmin (llama.cpp's layout). llama.cpp's
  own quantizer also searches each scale iteratively (make_qkx2_quants); this one pass is faster
  and somewhat less accurate (relative RMS error 0.078 on Gaussian weights, about what 16 levels
  over each block's range give).
Rows whose length is not a whole number of blocks stay as they are (Q4_K falls back to Q8_0 for
rows of a multiple of 32, e.g. smollm2's 576).
"""

from __future__ import annotations

from typing import Callable

import torch

from .gguf import QuantTensor, TYPE_IDS

Q8_0, Q4_K = TYPE_IDS["Q8_0"], TYPE_IDS["Q4_K"]
QUANTIZE_TYPES = {"q8_0": Q8_0, "q4_k": Q4_K}
BLOCK_ELEMS = {Q8_0: 32, Q4_K: 256}
_CHUNK = 1 << 20  # weights quantized per step: temporaries stay a few MB


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (ggml's roundf), not torch's half-to-even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape[:-1], -1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, cols] -> uint8 [rows, cols / 32 * 34]."""
    rows, cols = x.shape
    b = x.reshape(-1, 32)
    d = b.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round(b * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1).reshape(rows, -1)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, cols] -> uint8 [rows, cols / 256 * 144]."""
    rows, cols = x.shape
    b = x.reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks
    lo = b.amin(dim=2).clamp(max=0)  # w = d*sc*q - dmin*m: the minimum is never above 0
    scale = (b.amax(dim=2) - lo) / 15
    d = (scale.amax(dim=1, keepdim=True) / 63).half().float()
    dmin = ((-lo).amax(dim=1, keepdim=True) / 63).half().float()
    ls = torch.where(d > 0, _round(scale / d.clamp(min=1e-30)), 0).clamp(0, 63)
    lm = torch.where(dmin > 0, _round(-lo / dmin.clamp(min=1e-30)), 0).clamp(0, 63)
    step, off = (d * ls)[..., None], (dmin * lm)[..., None]
    q = torch.where(step > 0, _round((b + off) / step.clamp(min=1e-30)), 0).clamp(0, 15).to(torch.uint8)
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    sc = torch.empty(b.shape[0], 12, dtype=torch.uint8)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    q = q.reshape(-1, 4, 2, 32)  # pairs of sub-blocks share bytes: low nibble, high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), sc, qs], dim=1).reshape(rows, -1)


_FNS = {Q8_0: quantize_q8_0, Q4_K: quantize_q4_k}


def target_type(ggml_type: int, shape: tuple[int, ...], wanted: int | None) -> int:
    """The type a tensor is stored as: `wanted` for matrices whose rows are whole blocks (Q8_0 when
    only that fits), else unchanged (vectors, odd row lengths)."""
    if wanted is None or len(shape) != 2:
        return ggml_type
    for t in (wanted, Q8_0):
        if shape[1] % BLOCK_ELEMS[t] == 0:
            return t
    return ggml_type


def quantize(qt: QuantTensor, ggml_type: int, done: Callable[[], None] | None = None) -> QuantTensor:
    """A float QuantTensor (F32/F16/BF16) as `ggml_type` blocks, converted about a million weights at
    a time into one output; `done()` runs after each step (the loader drops the file pages read)."""
    from kernels.ref_quant import dequantize

    rows, cols = qt.shape
    step = max(1, _CHUNK // cols)
    out = torch.empty(rows, cols // BLOCK_ELEMS[ggml_type] * (34 if ggml_type == Q8_0 else 144), dtype=torch.uint8)
    for r in range(0, rows, step):
        dense = dequantize(qt.data[r : r + step], qt.ggml_type, (min(step, rows - r), cols))
        out[r : r + step] = _FNS[ggml_type](dense)
        if done is not None:
            done()
    return QuantTensor(qt.name, ggml_type, qt.shape, out)
