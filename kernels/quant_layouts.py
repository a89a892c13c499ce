"""GGUF block layouts shared by the torch dequantizer and the Triton kernels.

Every quantized row is a run of blocks; a block of QK weights takes BS bytes. Byte offsets of the
fields inside one block (f16 fields are little-endian; "qs" are the packed quants):

  Q4_0  (32, 18):  d@0 | qs[16]@2                  w = d * (q - 8)
  Q4_1  (32, 20):  d@0 m@2 | qs[16]@4              w = d * q + m
  Q5_0  (32, 22):  d@0 | qh[4]@2 | qs[16]@6        w = d * (q - 16)     (q = low nibble | high bit << 4)
  Q5_1  (32, 24):  d@0 m@2 | qh[4]@4 | qs[16]@8    w = d * q + m
  Q8_0  (32, 34):  d@0 | qs[32] int8@2             w = q * d
  Q2_K (256, 84):  scales[16]@0 | qs[64]@16 | d@80 dmin@82
  Q3_K (256,110):  hmask[32]@0 | qs[64]@32 | scales[12]@96 | d@108
  Q4_K (256,144):  d@0 dmin@2 | scales[12]@4 | qs[128]@16
  Q5_K (256,176):  d@0 dmin@2 | scales[12]@4 | qh[32]@16 | qs[128]@48
  Q6_K (256,210):  ql[128]@0 | qh[64]@128 | scales[16] int8@192 | d@208

The expressions (and their evaluation order, which bit-exactness depends on) follow
gguf.quants: scales are multiplied first ((d * sc) * q - dmin * m), never fused.
"""

from __future__ import annotations

import torch

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30

# ggml type -> (elements per block, bytes per block)
BLOCK: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}

NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
         Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}

# Kernels decode a weight tile as [.., sub-blocks, SUB]: every SUB consecutive weights share one
# scale, so scales are decoded once per sub-block and quants are read as contiguous byte runs.
SUB: dict[int, int] = {Q2_K: 16, Q3_K: 16, Q6_K: 16}


def sub_size(ggml_type: int) -> int:
    return SUB.get(ggml_type, 32)


FLOAT_TYPES = (F32, F16, BF16)
OFFSET_TYPES = (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K)  # w = a * q +/- c (a min field), else w = a * q
QUANT_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES


def check_type(ggml_type: int) -> tuple[int, int]:
    """(block elements, block bytes) of a supported type; a clear error for any other."""
    if ggml_type not in BLOCK:
        raise NotImplementedError(
            f"ggml type {ggml_type} is not supported; supported: {', '.join(NAMES.values())}"
        )
    return BLOCK[ggml_type]


def row_bytes(ggml_type: int, cols: int) -> int:
    qk, bs = check_type(ggml_type)
    if cols % qk:
        raise ValueError(f"{NAMES[ggml_type]} rows must be a multiple of {qk} elements, got {cols}")
    return cols // qk * bs


# f16 fields (byte offsets) of each block type and a magnitude for them that keeps random-block
# weights around unit size (1 / (largest |quant| * largest sub-block scale)).
F16_FIELDS: dict[int, tuple[tuple[int, ...], float]] = {
    Q4_0: ((0,), 1 / 8), Q4_1: ((0, 2), 1 / 8), Q5_0: ((0,), 1 / 16), Q5_1: ((0, 2), 1 / 16),
    Q8_0: ((0,), 1 / 127), Q2_K: ((80, 82), 1 / 45), Q3_K: ((108,), 1 / 128), Q4_K: ((0, 2), 1 / 945),
    Q5_K: ((0, 2), 1 / 1953), Q6_K: ((208,), 1 / 4064),
}


def random_blocks(
    ggml_type: int, rows: int, cols: int, gen: torch.Generator | None = None, unit: bool = True
) -> torch.Tensor:
    """uint8 [rows, row_bytes] of random blocks for tests and benchmarks: random quant bytes with
    finite f16 scale fields (unit=True: weights of about unit size; False: scales N(0, 1)).
    F32/F16/BF16 rows hold N(0, 1) values."""
    nbytes = row_bytes(ggml_type, cols)
    if ggml_type in FLOAT_TYPES:
        dt = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[ggml_type]
        return torch.randn(rows, cols, generator=gen).to(dt).view(torch.uint8).reshape(rows, nbytes)
    qk, bs = BLOCK[ggml_type]
    raw = torch.randint(0, 256, (rows * (cols // qk), bs), dtype=torch.uint8, generator=gen)
    offsets, mag = F16_FIELDS[ggml_type]
    for off in offsets:
        v = torch.randn(raw.shape[0], generator=gen) * (mag if unit else 1.0)
        raw[:, off : off + 2] = v.to(torch.float16).view(torch.uint8).reshape(-1, 2)
    return raw.reshape(rows, nbytes)
