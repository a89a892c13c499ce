"""Triton paged attention over the block KV cache, plus the KV store.

Layout: q/out [T, nh, hd] (flat batch, see kernels/metadata.py); caches [num_blocks, block_size, nkv, hd],
last dim contiguous. GQA packing: for one KV head, a sequence's query rows are its (token, head-of-group)
pairs, flattened as f = token * GROUP + head; a program owns BLOCK_M consecutive rows f of one sequence
(so every row of the `tl.dot` M dimension is used whatever GROUP is, and GROUP may exceed BLOCK_M).
Grid (T * GROUP // BLOCK_M + num_seqs, nkv, splits): an upper bound on the tiles of all sequences
whatever their lengths, so it depends only on shapes (CUDA-graph safe); each program finds its sequence
by binary search over cu_seqlens_q (tiles of b start at cu[b] * GROUP // BLOCK_M + b) and returns if
its tile is empty. Key tiles of BLOCK_N gather block ids from the block table, so a tile may cross
blocks.

Split-KV (decode batches too small to fill the GPU): the grid's split count is sized from host ints to
fill the SMs at the longest context (`choose_splits`); each tile then uses only `n_split` of them, from
its own key count (no fewer than MIN_SPLIT_KEYS keys per split, and about sqrt(keys x rows) / 2 so the
merge stays cheap next to the splits), and the others return at once. The splits write fp32 partials +
log2-sum-exp to a workspace and bump the tile's arrival counter (kernels/workspace.py); the last one to
arrive merges the partials in split order (deterministic, one writer per output element) and zeroes the
counter: no reduce launch. Host ints (max_seqlen_q/k) only pick configs; results never depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .metadata import AttentionMetadata
from .workspace import counters

__all__ = ["store_kv", "paged_attention", "AttentionWorkspace", "attention_workspace", "AttnConfig", "pick_config",
           "choose_splits", "dispatch_space"]

LOG2E = 1.4426950408889634
_LOG2E_K = tl.constexpr(1.4426950408889634)
MAX_SPLITS = 128  # one KV head at batch 1 fills ~all of an H100's 132 SMs
MIN_SPLIT_KEYS = 64  # fewer keys than this per split and the merge costs more than the split saves
_MIN_SPLIT_KEYS_K = tl.constexpr(MIN_SPLIT_KEYS)
COMBINE_ELEMS = 2048  # partial elements the merging program loads at once (CHUNK splits x padded head dim)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh,
                     s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
                     NKV: tl.constexpr, HEAD_DIM: tl.constexpr, NKV_P: tl.constexpr, HD_P: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
    # grid (T,): one token's K and V, all KV heads.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, NKV_P)[:, None]
    d = tl.arange(0, HD_P)[None, :]
    # slot -1 = padding: nothing read or written (slot broadcast first: the interpreter mishandles
    # a scalar bool & a tensor bool)
    m = (h * 0 + slot >= 0) & (h < NKV) & (d < HEAD_DIM)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    kx = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=m)
    tl.store(kc_ptr + blk * s_kcb + off * s_kcs + h * s_kch + d, kx.to(kc_ptr.dtype.element_ty), mask=m)
    vx = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=m)
    tl.store(vc_ptr + blk * s_vcb + off * s_vcs + h * s_vch + d, vx.to(vc_ptr.dtype.element_ty), mask=m)


@triton.jit
def _locate(cu_ptr, num_seqs, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(seq b, tile index within b) of this program."""
    pid = tl.program_id(0)
    lo = pid * 0
    hi = lo + num_seqs - 1
    while lo < hi:  # largest b with start(b) <= pid
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid) * GROUP // BLOCK_M + mid <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo, pid - (tl.load(cu_ptr + lo) * GROUP // BLOCK_M + lo)


@triton.jit
def _attn_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, wo_ptr, wl_ptr, cnt_ptr, cu_ptr, len_ptr, bt_ptr, num_seqs,
                 num_splits, scale_log2, softcap, window, s_qt, s_qh, s_ot, s_oh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
                 s_bt, s_wos, s_wot, s_woh, s_wls, s_wlt,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HD_P: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, SPLITS_P: tl.constexpr,
                 COMBINE_CHUNK: tl.constexpr):
    b, q_tile = _locate(cu_ptr, num_seqs, GROUP, BLOCK_M)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    f0 = q_tile * BLOCK_M
    if f0 >= q_len * GROUP:
        return
    kvh = tl.program_id(1)
    ctx = tl.load(len_ptr + b) - q_len  # keys already cached before this step's tokens

    f = f0 + tl.arange(0, BLOCK_M)
    row_ok = f < q_len * GROUP
    qi = f // GROUP
    head = kvh * GROUP + f % GROUP
    t = (q_start + qi).to(tl.int64)
    offs_d = tl.arange(0, HD_P)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + t[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(kc_ptr.dtype.element_ty)
    qpos = ctx + qi

    # Key range of this tile: causal end at its last query; window start at its first query.
    k_end = ctx + (tl.minimum(f0 + BLOCK_M, q_len * GROUP) - 1) // GROUP + 1
    k_first = ctx * 0
    if USE_WINDOW:
        k_first = tl.maximum(ctx + f0 // GROUP - window + 1, 0)
    k_lo = (k_first // BLOCK_N) * BLOCK_N
    k_hi = k_end
    n_split = k_lo * 0 + 1  # splits this tile really uses (<= num_splits, from its own key count)
    if SPLIT:
        n_tiles = tl.cdiv(k_end - k_lo, BLOCK_N)
        rows = tl.minimum(BLOCK_M, q_len * GROUP - f0)
        # Keys per split: enough that the partials the last program reads (n_split x rows) stay small next
        # to the keys each split reads (sqrt(keys x rows) / 2 balances the two), and MIN_SPLIT_KEYS at least.
        kps = tl.maximum(tl.sqrt(((k_end - k_lo) * rows).to(tl.float32)).to(tl.int32) // 2, _MIN_SPLIT_KEYS_K)
        per_tiles = tl.maximum(tl.cdiv(n_tiles, num_splits), tl.cdiv(kps, BLOCK_N))
        n_split = tl.maximum(tl.cdiv(n_tiles, per_tiles), 1)
        if tl.program_id(2) >= n_split:
            return  # short context: this split has no keys (and is not counted)
        per = per_tiles * BLOCK_N
        k_lo = k_lo + tl.program_id(2) * per
        k_hi = tl.minimum(k_end, k_lo + per)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_P], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for start in range(k_lo, k_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = (kpos < k_hi) & (kpos >= k_first)
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = kpos % BLOCK_SIZE
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + (blk * s_kb + slot * s_ks + kvh * s_kh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if USE_SOFTCAP:  # softcap * tanh(s / softcap), tanh through exp (no libdevice)
            e = tl.exp(2.0 * s * (scale_log2 / _LOG2E_K / softcap))
            s = (softcap * _LOG2E_K) * (1.0 - 2.0 / (e + 1.0))
        else:
            s = s * scale_log2
        mask = row_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            mask = mask & (qpos[:, None] - kpos[None, :] < window)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(vc_ptr + (blk * s_vb + slot * s_vs + kvh * s_vh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT:
        tl.store(out_ptr + t[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    elif n_split == 1:  # a short context: one split did it all
        tl.store(out_ptr + t[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # Partials, then the arrival counter of this (tile, KV head); the last split to arrive merges.
        sp = tl.program_id(2).to(tl.int64)
        tl.store(wo_ptr + sp * s_wos + t[:, None] * s_wot + head[:, None] * s_woh + offs_d[None, :], o, mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(wl_ptr + sp * s_wls + t * s_wlt + head, lse, mask=row_ok)
        tl.debug_barrier()  # every thread's partial stores precede the counter's release
        cnt = cnt_ptr + tl.program_id(0).to(tl.int64) * tl.num_programs(1) + kvh
        if tl.atomic_add(cnt, 1, sem="acq_rel") == n_split - 1:
            _combine(wo_ptr, wl_ptr, out_ptr, q_start, f0, tl.minimum(BLOCK_M, q_len * GROUP - f0), kvh, n_split,
                     s_wos, s_wot, s_woh, s_wls, s_wlt, s_ot, s_oh, GROUP, HEAD_DIM, HD_P, SPLITS_P, COMBINE_CHUNK)
            tl.store(cnt, 0)  # zero again for the next kernel that uses the counters


@triton.jit
def _combine(wo_ptr, wl_ptr, out_ptr, q_start, f0, rows, kvh, n_split, s_wos, s_wot, s_woh, s_wls, s_wlt, s_ot,
             s_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HD_P: tl.constexpr, SPLITS_P: tl.constexpr,
             CHUNK: tl.constexpr):
    """Merge the n_split partials of each of a tile's rows by their log2-sum-exp, in split order
    (deterministic); CHUNK splits' partials are loaded at once (loads in flight), bypassing L1 (.cg):
    other SMs wrote them."""
    offs_d = tl.arange(0, HD_P)
    d_ok = offs_d < HEAD_DIM
    all_s = tl.arange(0, SPLITS_P)
    for r in range(rows):
        f = f0 + r
        t = (q_start + f // GROUP).to(tl.int64)
        head = kvh * GROUP + f % GROUP
        lrow = wl_ptr + t * s_wlt + head
        m = tl.max(tl.load(lrow + all_s * s_wls, mask=all_s < n_split, other=float("-inf"), cache_modifier=".cg"), 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([HD_P], tl.float32)
        wsum = tl.zeros([CHUNK], tl.float32)
        for s0 in range(0, n_split, CHUNK):
            sp = s0 + tl.arange(0, CHUNK)
            w = tl.exp2(tl.load(lrow + sp * s_wls, mask=sp < n_split, other=float("-inf"), cache_modifier=".cg") - m)
            part = tl.load(wo_ptr + sp.to(tl.int64)[:, None] * s_wos + t * s_wot + head * s_woh + offs_d[None, :],
                           mask=(w > 0)[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            acc += tl.sum(w[:, None] * part, 0)  # an empty split's partial (weight 0) is never read
            wsum += w
        ws = tl.sum(wsum, 0)
        o = acc / tl.where(ws > 0, ws, 1.0)
        tl.store(out_ptr + t * s_ot + head * s_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, nkv, hd] into cache slots (block * block_size + offset); slot -1 is skipped."""
    T, nkv, hd = k.shape
    if T == 0:
        return
    assert k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NKV=nkv, HEAD_DIM=hd, NKV_P=triton.next_power_of_2(nkv),
        HD_P=triton.next_power_of_2(hd), BLOCK_SIZE=k_cache.shape[1], num_warps=4 if nkv * hd >= 1024 else 1)


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


HEAD_DIMS_PADDED = (32, 64, 128, 256)


def head_dim_padded(head_dim: int) -> int:
    assert 0 < head_dim <= 256, f"head_dim {head_dim} unsupported (max 256)"
    return max(32, triton.next_power_of_2(head_dim))


def is_decode(group: int, max_seqlen_q: int) -> bool:
    """Decode-like: one token per sequence, or every sequence's rows fit one 16-row tile."""
    return max_seqlen_q == 1 or max_seqlen_q * group <= 16


def pick_config(head_dim: int, group: int, max_seqlen_q: int, elem_bytes: int = 2) -> AttnConfig:
    """Config table by shape bucket (decode-like or prefill, padded head dim) for 16-bit caches; fp32
    caches (debugging, tests) get one small config that stays under the shared-memory limit at hd 256."""
    hd_p = head_dim_padded(head_dim)
    decode = is_decode(group, max_seqlen_q)
    if elem_bytes == 4:
        return AttnConfig(16 if decode else 32, 32, 4, 2)
    if decode:  # memory-bound: smallest M, wide key tiles in flight
        return AttnConfig(16, 128 if hd_p <= 64 else 64 if hd_p == 128 else 32, 4, 3)
    if hd_p == 256:
        return AttnConfig(64, 32, 4, 2)
    return AttnConfig(128, 64, 8, 3 if hd_p <= 64 else 2)


def dispatch_space() -> list[tuple[str, str, dict, int, int]]:
    """Every (kernel, cache dtype, constexprs, num_warps, num_stages) the dispatch below can launch on a GPU
    (for the sm_90 compile test). GROUP and BLOCK_SIZE values only change index arithmetic; flags are all
    on; split counts are a runtime argument except for their power-of-two padding (SPLITS_P, which with the
    head dim sets COMBINE_CHUNK): every padding up to MAX_SPLITS is listed. fp32 configs are the same at
    every head dim, so only hd 256 (the most shared memory) is listed."""
    out = []
    split_ps = [1 << i for i in range(1, (MAX_SPLITS - 1).bit_length() + 1)]
    for dtype, hds in (("bf16", HEAD_DIMS_PADDED), ("fp32", (256,))):
        for hd_p in hds:
            for msq, splits_p in [(1, 1), *((1, sp) for sp in split_ps), (512, 1)]:
                c = pick_config(hd_p, 1, msq, 4 if dtype == "fp32" else 2)
                out.append(("_attn_kernel", dtype, dict(
                    GROUP=7, HEAD_DIM=hd_p - 16 if hd_p > 32 else hd_p, HD_P=hd_p, BLOCK_M=c.block_m,
                    BLOCK_N=c.block_n, BLOCK_SIZE=16, SPLIT=splits_p > 1, USE_WINDOW=True, USE_SOFTCAP=True,
                    DOT_PREC="tf32x3" if dtype == "fp32" else "tf32", SPLITS_P=splits_p,
                    COMBINE_CHUNK=combine_chunk(splits_p, hd_p)), c.num_warps, c.num_stages))
    return out


@dataclass
class AttentionWorkspace:
    """Split-KV partials, allocated once outside the op so a captured decode graph reuses them."""

    out: torch.Tensor  # [num_splits, max_tokens, nh, hd] fp32
    lse: torch.Tensor  # [num_splits, max_tokens, nh] fp32 (log2 units)

    @property
    def num_splits(self) -> int:
        return self.out.shape[0]


def attention_workspace(max_tokens: int, num_heads: int, head_dim: int, device: torch.device | str,
                        num_splits: int = MAX_SPLITS) -> AttentionWorkspace:
    return AttentionWorkspace(
        torch.empty(num_splits, max_tokens, num_heads, head_dim, dtype=torch.float32, device=device),
        torch.empty(num_splits, max_tokens, num_heads, dtype=torch.float32, device=device))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to pick split counts on the interpreter


def choose_splits(programs: int, max_seqlen_k: int, sm_count: int, limit: int) -> int:
    """Grid splits: enough (tile, KV head, split) programs to fill the SMs at the longest context the call
    (or captured graph) serves, MIN_SPLIT_KEYS keys each at least. Each tile then uses only the splits its
    own key count warrants (the kernel's `n_split`); the rest of the grid returns at once."""
    if programs >= sm_count:
        return 1
    return max(1, min(limit, triton.cdiv(sm_count, programs), triton.cdiv(max_seqlen_k, MIN_SPLIT_KEYS)))


def combine_chunk(num_splits: int, hd_p: int) -> int:
    return max(1, min(triton.next_power_of_2(num_splits), COMBINE_ELEMS // hd_p))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int = 0, softcap: float = 0.0, out: torch.Tensor | None = None,
                    workspace: AttentionWorkspace | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Causal varlen attention of q [T, nh, hd] over the paged cache (semantics: reference.paged_attention).

    Split-KV is used for decode-like batches too small to fill the GPU (splits chosen from host ints:
    for graph capture pass meta.max_seqlen_k as the longest context the graph will serve, and a
    `workspace`); `num_splits` forces a split count (tests, benchmarks). Rows of no sequence are untouched.
    """
    T, nh, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    group = nh // nkv
    if out is None:
        out = torch.empty_like(q)
    B = meta.num_seqs
    if T == 0 or B == 0:
        return out
    assert q.stride(-1) == out.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert meta.block_tables.stride(-1) == 1 and meta.cu_seqlens_q.is_contiguous() and meta.seq_lens.is_contiguous()
    cfg = pick_config(hd, group, meta.max_seqlen_q, k_cache.element_size())
    tiles = T * group // cfg.block_m + B
    if num_splits is None:
        decode = is_decode(group, meta.max_seqlen_q)
        limit = workspace.num_splits if workspace is not None else MAX_SPLITS
        num_splits = choose_splits(tiles * nkv, meta.max_seqlen_k, _sm_count(q.device), limit) if decode else 1
    split = num_splits > 1
    if split and (workspace is None or workspace.out.shape[1] < T or workspace.num_splits < num_splits):
        workspace = attention_workspace(T, nh, hd, q.device, num_splits)
    wo, wl = (workspace.out, workspace.lse) if split else (out, out)
    hd_p = head_dim_padded(hd)
    cnt = counters(q.device, tiles * nkv) if split else meta.seq_lens
    _attn_kernel[(tiles, nkv, num_splits)](
        q, k_cache, v_cache, out, wo, wl, cnt, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, B,
        num_splits, scale * LOG2E, float(softcap), int(sliding_window), q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0), wo.stride(0), wo.stride(1),
        wo.stride(2), wl.stride(0), wl.stride(1), GROUP=group, HEAD_DIM=hd, HD_P=hd_p, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_SIZE=bs, SPLIT=split, USE_WINDOW=sliding_window > 0,
        USE_SOFTCAP=softcap > 0, DOT_PREC="tf32x3" if k_cache.dtype == torch.float32 else "tf32",
        SPLITS_P=triton.next_power_of_2(num_splits), COMBINE_CHUNK=combine_chunk(num_splits, hd_p),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
