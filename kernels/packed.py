"""GGUF matrices repacked at load into aligned planes that the decode kernels read 16 bytes at a time.

GGUF blocks are 18-210 bytes, so rows and fields are not 16-byte aligned and a GEMV over them
compiles to byte loads. `pack` rewrites a matrix [N, K] (N padded to a multiple of 8) once, on its
device, as planes whose rows are interleaved in groups of 8 (row n = 8 * g + r):

  q    int32 [N/8, KW, 8]   quants in k order: 4-bit types 8 per word (weight 8u + j in bits
                            4j..4j+3 of word u), Q8_0 4 per word (byte j = q + 128, unsigned)
  h    int32 [N/8, K/32, 8] the fifth bit of 5-bit types (bit j of word g: weight 32g + j), or
             [N/8, K/16, 8] Q6_K's two high bits (bits 2j, 2j+1 of word g: weight 16g + j)
  d    fp16  [N/8, K/G, 8]  the block scale d (G = 32), or the super-block d (G = 256: K-quants)
  m    fp16  [N/8, K/G, 8]  Q4_1/Q5_1 min m, K-quants' dmin
  sc   uint8 [N/8, K/S, 8]  K-quants' sub-block scale (S = 32; Q6_K: S = 16, int8)
  mn   uint8 [N/8, K/32, 8] Q4_K/Q5_K sub-block min

The 8 rows of one group sit side by side, so a thread reads the same word of 8 rows with two
16-byte loads, and the activations it multiplies with serve all 8. Weights: w = a * q + c per group
with a = d (K-quants: d * sc) and c = m, -dmin * mn, or -off * a for the signed types (Q4_0 q - 8,
Q5_0 q - 16, Q8_0 q - 128, Q6_K q - 32): the same values as gguf.quants, bit for bit (a = d * sc is
exact in fp32). Q2_K, Q3_K and float matrices are not packed (kernels/qmatmul.py's GGUF-block
kernels serve them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant_layouts as L
from . import ref_quant as R

PACKED_TYPES = (L.Q4_0, L.Q4_1, L.Q5_0, L.Q5_1, L.Q8_0, L.Q4_K, L.Q5_K, L.Q6_K)
ROWS = 8  # rows interleaved per group
# ggml type -> (quant bits in the q plane, high bits in h, weights per d/m entry, weights per sc entry,
#               quant offset subtracted before scaling)
FORMAT: dict[int, tuple[int, int, int, int, int]] = {
    L.Q4_0: (4, 0, 32, 0, 8), L.Q4_1: (4, 0, 32, 0, 0), L.Q5_0: (4, 1, 32, 0, 16), L.Q5_1: (4, 1, 32, 0, 0),
    L.Q8_0: (8, 0, 32, 0, 128), L.Q4_K: (4, 0, 256, 32, 0), L.Q5_K: (4, 1, 256, 32, 0), L.Q6_K: (4, 2, 256, 16, 32),
}


@dataclass
class PackedWeight:
    """A matrix [N, K] in planes (see the module doc); `rows` = N rounded up to a multiple of 8."""

    name: str
    ggml_type: int
    shape: tuple[int, int]
    q: torch.Tensor
    h: torch.Tensor | None = None
    d: torch.Tensor | None = None
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None
    pair: int = 0  # > 0: rows [0, pair) and [pair, 2 * pair) are a gate and an up matrix (fused epilogue);
    # set by TritonOps.prepare_gate_up when `pair` is a multiple of 8, so up's row groups follow gate's

    @property
    def rows(self) -> int:
        return self.q.shape[0] * ROWS

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.h, self.d, self.m, self.sc, self.mn)
                   if t is not None)


def _interleave(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, C] -> [N_pad / 8, C, 8] (row 8g + r at [g, :, r]); padding rows are zero."""
    if n_pad != x.shape[0]:
        x = torch.cat([x, x.new_zeros(n_pad - x.shape[0], x.shape[1])])
    return x.reshape(n_pad // ROWS, ROWS, x.shape[1]).transpose(1, 2).contiguous()


def _words(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, K] values < 2^bits -> int32 [N, K * bits / 32], value j of a word at bits*j."""
    per = 32 // bits
    v = vals.to(torch.int64).reshape(vals.shape[0], -1, per)
    shifts = torch.arange(per, device=vals.device, dtype=torch.int64) * bits
    word = (v << shifts).sum(-1)  # disjoint bits: the sum is the bitwise or, < 2^32
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def _fields(qt_data: torch.Tensor, t: int, n: int, k: int) -> dict[str, torch.Tensor]:
    """Quants (uint8 [N, K], k order) and scale fields ([N, K / group]) of GGUF rows."""
    qk, bs = L.BLOCK[t]
    b = qt_data.reshape(-1, bs)
    f16 = lambda off: b.view(torch.float16)[:, off // 2].reshape(n, -1)  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    if t == L.Q4_0:
        out |= {"q": R._nibbles(b[:, 2:18], 1).reshape(n, k), "d": f16(0)}
    elif t == L.Q4_1:
        out |= {"q": R._nibbles(b[:, 4:20], 1).reshape(n, k), "d": f16(0), "m": f16(2)}
    elif t in (L.Q5_0, L.Q5_1):
        o = 2 if t == L.Q5_0 else 4
        lo = R._nibbles(b[:, o + 4:o + 20], 1).reshape(n, k)
        out |= {"q": lo, "h": R._fields(b[:, o:o + 4], 1, 1, 8).transpose(2, 3).reshape(n, k), "d": f16(0)}
        if t == L.Q5_1:
            out["m"] = f16(2)
    elif t == L.Q8_0:
        out |= {"q": (b[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8).reshape(n, k), "d": f16(0)}
    elif t in (L.Q4_K, L.Q5_K):
        sc, mn = R._k_scale_min(b[:, 4:16])
        qo = 16 if t == L.Q4_K else 48
        out |= {"q": R._nibbles(b[:, qo:qo + 128], 4).reshape(n, k), "d": f16(0), "m": f16(2),
                "sc": sc.reshape(n, -1), "mn": mn.reshape(n, -1)}
        if t == L.Q5_K:
            out["h"] = R._planes(b[:, 16:48]).reshape(n, k)
    else:  # Q6_K: q = low nibble | 2 high bits << 4, in the order ref_quant decodes it
        nb = b.shape[0]
        ql = R._nibbles(b[:, :128], 2).reshape(nb, 2, 4, 32)
        qh = R._crumbs(b[:, 128:192], 2)
        out |= {"q": ql.reshape(n, k), "h": qh.reshape(n, k), "d": f16(208),
                "sc": b[:, 192:208].reshape(n, -1)}
    return out


def pack(qt) -> PackedWeight:
    """A QuantTensor [N, K] of a PACKED_TYPES type -> PackedWeight on the same device."""
    t, (n, k) = qt.ggml_type, qt.shape
    if t not in PACKED_TYPES:
        raise ValueError(f"{L.NAMES.get(t, t)} matrices are not packed")
    if k % 256 and t in (L.Q4_K, L.Q5_K, L.Q6_K) or k % 32:
        raise ValueError(f"{qt.name}: K = {k} is not whole blocks")
    f = _fields(qt.data, t, n, k)
    n_pad = -(-n // ROWS) * ROWS
    qbits, hbits = FORMAT[t][0], FORMAT[t][1]
    planes: dict[str, torch.Tensor] = {"q": _interleave(_words(f["q"], qbits), n_pad)}
    if hbits:
        planes["h"] = _interleave(_words(f["h"], hbits), n_pad)
    for name in ("d", "m", "sc", "mn"):
        if name in f:
            planes[name] = _interleave(f[name].contiguous(), n_pad)
    return PackedWeight(qt.name, t, (n, k), **planes)

