"""Torch implementations of every op: the CPU path and the oracle for the Triton kernels.

Shapes (T = flat tokens of a step, H = hidden size, nh/nkv = query/KV heads, hd = head dim):
- linear: x [T, K] @ w [N, K]^T -> [T, N]; weights arrive dense (dequantized once at load).
- rms_norm: x [..., H]; with `residual`, x + residual is normalized and also returned.
- rope: q [T, nh, hd], k [T, nkv, hd], positions [T], cos_sin [max_pos, rot_dim] (cos | sin halves).
- KV cache per layer: [num_blocks, block_size, nkv, hd]; see kernels/metadata.py for the batch.
All arithmetic is fp32 whatever the storage dtype, as the kernels do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata
from .ref_quant import dequantize

__all__ = [
    "dequantize", "qmatmul", "linear", "embedding", "rms_norm", "rope", "silu_mul", "gelu_tanh_mul",
    "store_kv", "rope_store_kv", "paged_attention", "rope_cache", "layer_norm", "gelu", "dense_attention",
]


def qmatmul(x: torch.Tensor, w) -> torch.Tensor:
    """Reference for the fused quantized matmul: dequantize `w` (a QuantTensor), then matmul in fp32."""
    dense = dequantize(w.data, w.ggml_type, w.shape, torch.float32)
    return (x.float() @ dense.T).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ w.T
    return y + bias if bias is not None else y


def embedding(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w[ids]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normalized, new residual). With `residual`, normalizes x + residual (the fused add)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), x


def rope_cache(base: float, rot_dim: int, max_pos: int, device: torch.device | str = "cpu",
               freq_factors: tuple[float, ...] | None = None) -> torch.Tensor:
    """[max_pos, rot_dim]: cos of each angle in the first half, sin in the second (fp32).
    `freq_factors` [rot_dim / 2] divide the frequencies (rope scaling, llama.cpp's rope_freqs)."""
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    xf = x.float()
    xr, xpass = xf[..., :rot], xf[..., rot:]
    if neox:  # split halves
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # adjacent pairs
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, xpass], dim=-1).to(x.dtype)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, neox: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin.shape[-1] // 2
    cs = cos_sin[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _rotate(q, cos, sin, neox), _rotate(k, cos, sin, neox)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new tokens' K/V into their slots; slot -1 is padding and is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    nb, bs = k_cache.shape[:2]
    k_cache.view(nb * bs, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def rope_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, neox: bool,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
) -> torch.Tensor:
    """The attention prologue: per-head RMSNorm of q and of k where a weight is given (each rounded to the
    input dtype), RoPE of both, the rotated k and v stored at `slot_mapping` (-1: padding, skipped).
    Returns the rotated q; the inputs are not modified."""
    if q_norm is not None:
        q, _ = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k, _ = rms_norm(k, k_norm, eps)
    q, k = rope(q, k, positions, cos_sin, neox)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys (read via the block table).

    A query at position p sees keys at positions j <= p, and with a sliding window only p - j < window.
    """
    T, nh, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    group = nh // nkv
    if out is None:
        out = torch.empty_like(q)
    cu = meta.cu_seqlens_q.tolist()
    lens = meta.seq_lens.tolist()
    for b, L in enumerate(lens):
        qs, qe = cu[b], cu[b + 1]
        ql = qe - qs
        if ql == 0 or L == 0:
            continue
        blocks = meta.block_tables[b, : math.ceil(L / bs)].long()
        k = k_cache[blocks].reshape(-1, nkv, hd)[:L].float()
        v = v_cache[blocks].reshape(-1, nkv, hd)[:L].float()
        qpos = torch.arange(L - ql, L, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window > 0:
            mask &= qpos - kpos < sliding_window
        qb = q[qs:qe].float().view(ql, nkv, group, hd)
        s = torch.einsum("qngd,knd->ngqk", qb, k) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("ngqk,knd->qngd", p, v)
        out[qs:qe] = o.reshape(ql, nh, hd).to(out.dtype)
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension with weight and bias (encoders), in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU of BERT-family MLPs, in fp32."""
    return F.gelu(x.float()).to(x.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Bidirectional attention within each sequence of a flat batch (encoders: every token sees
    every token of its own input, no cache). q [T, nh, hd], k/v [T, nkv, hd]; sequence b owns rows
    cu_seqlens[b] : cu_seqlens[b + 1]."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            qs = q[a:b].float().transpose(0, 1)  # [nh, L, hd]
            ks = k[a:b].float().transpose(0, 1).repeat_interleave(group, 0)
            vs = v[a:b].float().transpose(0, 1).repeat_interleave(group, 0)
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            out[a:b] = o.transpose(0, 1).to(out.dtype)
    return out
