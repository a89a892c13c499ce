"""Triton dequantization (kernels/dequant.py): bit-exact against the torch reference, which
tests/test_ref_quant.py checks bit-exact against gguf.quants. Interpreter on CPU, compiled on a GPU.

Shapes are ragged against the kernel tile (8 rows x 256 weights): 5 or 13 rows, rows of 96 or
768 weights, several super-blocks per row so block addressing past the first block is covered.
Outputs are pre-filled with NaN so an element the kernel never writes fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import quant_layouts as L
from kernels import ref_quant
from kernels.dequant import dequantize

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _cols(t: int) -> int:
    return 768 if L.BLOCK[t][0] == 256 else 96 if t in L.QUANT_TYPES else 300


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.cpu()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("t", L.ALL_TYPES, ids=L.NAMES.get)
def test_bit_exact_fp32(t):
    # normal-sized f16 scales (unit=False) reach large and tiny weights alike
    rows, cols = 5, _cols(t)
    raw = L.random_blocks(t, rows, cols, torch.Generator().manual_seed(t), unit=False)
    want = ref_quant.dequantize(raw, t, (rows, cols))
    out = torch.full((rows, cols), float("nan"), device=DEV)
    got = dequantize(raw.to(DEV), t, (rows, cols), torch.float32, out=out)
    assert got is out
    _assert_bits_equal(got, want)


@pytest.mark.parametrize("t", [L.F16, L.BF16], ids=["F16", "BF16"])
def test_every_16_bit_pattern(t):
    raw = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).reshape(128, 1024)
    _assert_bits_equal(dequantize(raw.to(DEV), t, (128, 512)), ref_quant.dequantize(raw, t, (128, 512)))


@pytest.mark.parametrize("t", [L.Q4_1, L.Q5_K, L.Q6_K, L.F32], ids=L.NAMES.get)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output(t, dtype):
    # fp32 result rounded once to the output dtype, exactly as the reference does
    if dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("the interpreter truncates fp32 -> bf16 instead of rounding (GPU only)")
    rows, cols = 13, _cols(t)
    raw = L.random_blocks(t, rows, cols, torch.Generator().manual_seed(7))
    got = dequantize(raw.to(DEV), t, (rows, cols), dtype)
    assert got.dtype == dtype and got.device.type == DEV
    assert torch.equal(got.cpu(), ref_quant.dequantize(raw, t, (rows, cols), dtype))


@pytest.mark.parametrize("t", [L.Q8_0, L.Q4_K, L.Q5_0], ids=L.NAMES.get)
def test_embedding_rows(t):
    """The backend's embedding path: gather some rows, then dequantize only those."""
    raw = L.random_blocks(t, 40, 256, torch.Generator().manual_seed(8))
    ids = torch.tensor([39, 0, 7, 7, 21])
    rows = raw.to(DEV).index_select(0, ids.to(DEV))
    got = dequantize(rows, t, (5, 256), torch.float32)
    _assert_bits_equal(got, ref_quant.dequantize(raw, t, (40, 256))[ids])


def test_empty_and_bad_shapes():
    raw = L.random_blocks(L.Q4_0, 2, 64, torch.Generator().manual_seed(9)).to(DEV)
    assert dequantize(raw[:0], L.Q4_0, (0, 64)).shape == (0, 64)
    with pytest.raises(ValueError):
        dequantize(raw, L.Q4_0, (2, 96))
    with pytest.raises(NotImplementedError):
        dequantize(raw, 16, (2, 64))
