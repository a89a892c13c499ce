"""kernels/ref_quant.py (vectorized torch dequantization) against gguf.quants.dequantize, bit for bit."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kernels import quant_layouts as L
from kernels import ref_quant


def _oracle(raw: torch.Tensor, t: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw.numpy(), GGMLQuantizationType(t)))).float()


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Identical fp32 bit patterns; NaNs only need to be NaN in both (torch quiets signalling NaNs)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("t", L.ALL_TYPES, ids=L.NAMES.get)
@pytest.mark.parametrize("unit", [True, False], ids=["unit-scales", "normal-scales"])
def test_bit_exact_random_blocks(t, unit):
    # Random quant bytes exercise every code path; f16 scale fields are finite (N(0, 1) or unit-sized).
    g = torch.Generator().manual_seed(t)
    rows, cols = 7, 3 * 256 if L.BLOCK[t][0] == 256 else 5 * 32
    raw = L.random_blocks(t, rows, cols, g, unit=unit)
    got = ref_quant.dequantize(raw, t, (rows, cols))
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    _assert_bits_equal(got, _oracle(raw, t).reshape(rows, cols))


@pytest.mark.parametrize("t", [L.F16, L.BF16], ids=["F16", "BF16"])
def test_every_16_bit_pattern(t):
    raw = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).reshape(256, 512)
    _assert_bits_equal(ref_quant.dequantize(raw, t, (256, 256)), _oracle(raw, t).reshape(256, 256))


def test_f32_is_a_copy_not_a_view():
    raw = torch.randn(3, 8).view(torch.uint8)
    out = ref_quant.dequantize(raw, L.F32, (3, 8))
    assert torch.equal(out, raw.view(torch.float32))
    out.zero_()
    assert raw.view(torch.float32).abs().sum() > 0


@pytest.mark.parametrize("t", [L.Q4_1, L.Q5_0, L.Q3_K, L.Q6_K, L.F16], ids=L.NAMES.get)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_is_one_rounding(t, dtype):
    raw = L.random_blocks(t, 4, 512, torch.Generator().manual_seed(1))
    want = ref_quant.dequantize(raw, t, (4, 512)).to(dtype)
    got = ref_quant.dequantize(raw, t, (4, 512), dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("t", [L.Q4_0, L.Q5_1, L.Q2_K, L.Q5_K], ids=L.NAMES.get)
def test_chunked_path_with_ragged_tail(t, monkeypatch):
    # Several chunks plus a partial last one, in fp32 (written in place) and bf16 (via scratch).
    monkeypatch.setattr(ref_quant, "_CHUNK_ELEMS", 3 * 256)
    raw = L.random_blocks(t, 11, 768, torch.Generator().manual_seed(2))
    want = _oracle(raw, t).reshape(11, 768)
    _assert_bits_equal(ref_quant.dequantize(raw, t, (11, 768)), want)
    assert torch.equal(ref_quant.dequantize(raw, t, (11, 768), torch.bfloat16), want.to(torch.bfloat16))


def test_1d_and_3d_shapes():
    raw = L.random_blocks(L.Q8_0, 1, 96, torch.Generator().manual_seed(3))
    assert ref_quant.dequantize(raw, L.Q8_0, (96,)).shape == (96,)
    assert ref_quant.dequantize(raw.reshape(3, 34), L.Q8_0, (3, 1, 32)).shape == (3, 1, 32)


def test_bad_inputs_raise():
    raw = L.random_blocks(L.Q4_0, 2, 64, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError):
        ref_quant.dequantize(raw, L.Q4_0, (2, 96))
    with pytest.raises(NotImplementedError, match="not supported"):
        ref_quant.dequantize(raw, 16, (2, 64))  # IQ2_XXS


def _model(name: str) -> str:
    path = os.path.expanduser(f"~/.cache/llamatron/{name}.gguf")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    return path


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_tensors_bit_exact(name):
    """The first rows of one tensor of every type in a real file."""
    from engine.loading.gguf import GGUFFile

    f = GGUFFile(_model(name))
    seen: set[int] = set()
    for info in f.tensors.values():
        if info.ggml_type in seen:
            continue
        seen.add(info.ggml_type)
        qt = f.tensor(info.name)
        rows = qt.data[:64]
        shape = (rows.shape[0], qt.shape[-1]) if len(qt.shape) > 1 else qt.shape
        _assert_bits_equal(ref_quant.dequantize(rows, qt.ggml_type, shape), _oracle(rows, qt.ggml_type).reshape(shape))
    assert len(seen) >= 3


@pytest.mark.slow
def test_gemma_embedding_load_time():
    """The largest CPU-path tensor (262144 x 640 Q8_0): fast enough for start-up on 2 cores."""
    from engine.loading.gguf import GGUFFile

    qt = GGUFFile(_model("gemma-3-270m")).tensor("token_embd.weight")
    qt.data.sum()  # fault the mmap in first: this measures dequantization, not the disk
    t0 = time.perf_counter()
    w = ref_quant.dequantize(qt.data, qt.ggml_type, qt.shape)
    elapsed = time.perf_counter() - t0
    assert w.shape == (262144, 640)
    assert elapsed < 5.0, f"{elapsed:.2f} s"  # about 0.4 s on 2 idle cores; slack for a busy machine
