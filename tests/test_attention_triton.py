"""Triton paged attention and KV store against kernels/reference.py (interpreter on CPU, compiled on a GPU).

Every batch is built the way the runner builds it: shuffled, non-contiguous blocks, a cached prefix
written straight into the cache, the new tokens stored through `store_kv`, NaN everywhere else in the
cache (unused blocks, slots past each sequence's end) and in the outputs, so any read of a slot that
should not be read, or any row left unwritten (or written when it should not be), shows.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels import reference as ref
from kernels.attention import attention_workspace, paged_attention, store_kv
from kernels.metadata import AttentionMetadata
from kernels.workspace import counters

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
NAN = float("nan")


def make_batch(specs, nh, nkv, hd, dtype=torch.float32, bs=16, pad_rows=0, seed=0):
    """specs: (cached, new) per sequence; (0, 0) is a padded sequence. Returns the batch and its caches."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil((c + n) / bs) for c, n in specs]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(max(need), 1) + 1
    bt = torch.full((len(specs), max_blocks), -1, dtype=torch.int32)
    kc = torch.full((num_blocks, bs, nkv, hd), NAN)
    vc = torch.full_like(kc, NAN)
    slots, cu = [], [0]
    for b, (c, n) in enumerate(specs):
        bt[b, : need[b]] = torch.tensor([perm.pop() for _ in range(need[b])], dtype=torch.int32)
        pos_slot = [int(bt[b, p // bs]) * bs + p % bs for p in range(c + n)]
        flat_k, flat_v = kc.view(-1, nkv, hd), vc.view(-1, nkv, hd)
        for p in range(c):  # the cached prefix, written by earlier steps
            flat_k[pos_slot[p]] = torch.randn(nkv, hd, generator=g)
            flat_v[pos_slot[p]] = torch.randn(nkv, hd, generator=g)
        slots += pos_slot[c:]
        cu.append(cu[-1] + n)
    T = cu[-1] + pad_rows
    slots += [-1] * pad_rows
    q = torch.randn(T, nh, hd, generator=g)
    k = torch.randn(T, nkv, hd, generator=g)
    v = torch.randn(T, nkv, hd, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        block_tables=bt.to(DEV),
        seq_lens=torch.tensor([c + n for c, n in specs], dtype=torch.int32, device=DEV),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEV),
        max_seqlen_q=max(n for _, n in specs),
        max_seqlen_k=max(c + n for c, n in specs),
        block_size=bs,
    )
    to = lambda x: x.to(dtype).to(DEV)  # noqa: E731
    return to(q), to(k), to(v), to(kc), to(vc), meta


def run_both(specs, nh, nkv, hd, *, dtype=torch.float32, pad_rows=0, window=0, softcap=0.0,
             num_splits=None, workspace=False, seed=0, scale=None, merged=False):
    q, k, v, kc, vc, meta = make_batch(specs, nh, nkv, hd, dtype, pad_rows=pad_rows, seed=seed)
    scale = scale if scale is not None else hd ** -0.5
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref.store_kv(k, v, kc_ref, vc_ref, meta.slot_mapping)
    store_kv(k, v, kc, vc, meta.slot_mapping)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    want = ref.paged_attention(q, kc_ref, vc_ref, meta, scale, window, softcap, out=torch.full_like(q, NAN))
    ws = None
    if workspace:
        ws = attention_workspace(q.shape[0] + 3, nh, hd, DEV, num_splits=num_splits or 4)
        ws.out.fill_(NAN)
        ws.lse.fill_(NAN)
    out = torch.full_like(q, NAN)
    got = paged_attention(q, kc, vc, meta, scale, window, softcap, out=out, workspace=ws, num_splits=num_splits)
    assert got is out
    tol = dict(rtol=1e-2, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)  # padded rows stay NaN in both
    assert torch.isfinite(got[: int(meta.cu_seqlens_q[-1])]).all()
    assert not counters(q.device, 1 << 16).any(), "an arrival counter was left non-zero"
    if merged:  # some tile really used more than one split (its partials were merged by the last one)
        assert ws is not None and not torch.isnan(ws.lse[1]).all()
    return got


GQA = [(4, 4), (9, 3), (14, 2), (7, 1)]  # ratios 1, 3, 7, 7
RAGGED_DECODE = [(0, 1), (16, 1), (30, 1), (69, 1), (5, 1)]


@pytest.mark.parametrize("nh,nkv", GQA)
def test_decode_ragged(nh, nkv):
    run_both(RAGGED_DECODE, nh, nkv, 64, pad_rows=2)


@pytest.mark.parametrize("nh,nkv", GQA)
def test_decode_split_kv_with_workspace(nh, nkv):
    run_both(RAGGED_DECODE, nh, nkv, 64, num_splits=3, workspace=True)


@pytest.mark.parametrize("nh,nkv", GQA)
def test_prefill_fresh_and_prefix_cached(nh, nkv):
    # Fresh prompts, and prompts whose first blocks came from the prefix cache (queries mid-sequence).
    run_both([(0, 37), (0, 5), (32, 19), (21, 40)], nh, nkv, 64)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (9, 3), (7, 1)])
def test_mixed_batch_with_padding(nh, nkv):
    # Chunked prefill + decodes + a sequence with no new tokens + padded sequences + padded rows.
    specs = [(0, 23), (40, 1), (0, 0), (15, 1), (7, 9), (12, 0), (33, 2), (0, 0)]
    run_both(specs, nh, nkv, 64, pad_rows=3)


@pytest.mark.parametrize("window", [1, 8, 20])
def test_sliding_window(window):
    run_both([(0, 37), (25, 1), (50, 1), (18, 11)], 9, 3, 64, window=window)


def test_sliding_window_split_kv():
    run_both([(70, 1), (3, 1), (45, 1)], 14, 2, 64, window=24, num_splits=4)


def test_softcap():
    # Scale large enough that the cap bites (|s| well past softcap before tanh).
    run_both([(0, 20), (30, 1), (9, 6)], 9, 3, 64, softcap=5.0, scale=1.0)


def test_softcap_window_split():
    run_both([(60, 1), (20, 1)], 7, 1, 64, softcap=8.0, window=17, num_splits=5, scale=0.5)


def test_split_kv_general_batch():
    # The split kernel is the same kernel: prefill and mixed tiles must merge correctly too.
    run_both([(0, 30), (16, 1), (9, 13), (0, 0)], 9, 3, 64, num_splits=3, pad_rows=1)


@pytest.mark.parametrize("hd", [32, 80, 128, 256])
def test_head_dims(hd):
    run_both([(0, 9), (21, 1), (10, 4)], 6, 2, hd)


@pytest.mark.parametrize("split", [None, 2])
def test_fp16(split):
    run_both([(0, 19), (35, 1), (8, 3)], 9, 3, 64, dtype=torch.float16, num_splits=split)


def test_auto_split_choice_is_graph_safe():
    """Decode with a long max_seqlen_k picks split-KV from host ints alone, reusing the workspace."""
    from kernels.attention import choose_splits

    assert choose_splits(1 * 8, 16384, 132, 16) == 16
    assert choose_splits(64 * 8, 16384, 132, 16) == 1  # grid already fills the GPU
    assert choose_splits(8, 300, 132, 16) == 5  # short contexts: MIN_SPLIT_KEYS per split
    # batch 1 of the 1-3 KV-head models fills the 132 SMs at long contexts (qwen2.5 2, smollm2 3, gemma3 1)
    assert [n * choose_splits(n, 16384, 132, 128) for n in (2, 3, 1)] == [132, 132, 128]
    q, k, v, kc, vc, meta = make_batch([(400, 1), (3, 1)], 8, 2, 64)
    store_kv(k, v, kc, vc, meta.slot_mapping)
    meta.max_seqlen_k = 4096  # as a runner capturing a graph for long contexts would pass
    ws = attention_workspace(4, 8, 64, DEV, num_splits=4)
    ws.lse.fill_(NAN)
    got = paged_attention(q, kc, vc, meta, 0.125, workspace=ws)
    assert not torch.isnan(ws.lse[:, :1]).any(), "split path with the caller's workspace not taken"
    assert torch.isnan(ws.lse[:, 1]).all(), "a 4-key context must not be split"
    want = ref.paged_attention(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_store_kv_strided_and_padding():
    # k/v as views of a fused qkv projection (non-contiguous rows); slot -1 rows must not be written.
    g = torch.Generator().manual_seed(3)
    T, nh, nkv, hd = 7, 6, 3, 48
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g).to(DEV)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
    kc = torch.full((4, 16, nkv, hd), NAN, device=DEV).half()
    vc = torch.full_like(kc, NAN)
    slots = torch.tensor([5, -1, 17, 63, -1, 0, 40], device=DEV)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref.store_kv(k, v, kc_ref, vc_ref, slots)
    store_kv(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(kc).sum() == kc.numel() - 5 * nkv * hd


@pytest.mark.parametrize("specs", [[(30, 1), (0, 1), (17, 1)], [(0, 6), (21, 3), (40, 1)]])
def test_group_wider_than_tile(specs):
    # 40 query heads on 2 KV heads: GROUP 20 spans two 16-row decode tiles; prefill tiles cut tokens.
    run_both(specs, 40, 2, 32)


LONG_DECODE = [(700, 1), (3, 1), (1000, 1), (0, 1), (257, 1)]


@pytest.mark.parametrize("nh,nkv", GQA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_merged_by_last_program(nh, nkv, dtype):
    # Contexts long enough for several splits per tile; short ones in the same batch use one (or none).
    run_both(LONG_DECODE, nh, nkv, 64, dtype=dtype, num_splits=16, workspace=True, merged=True, pad_rows=2)


def test_split_merge_auto_window_softcap_hd256():
    # gemma3-like: 4 q heads on 1 KV head, hd 256, sliding window and softcap; splits from host ints.
    run_both([(900, 1), (40, 1), (600, 1)], 4, 1, 256, window=300, softcap=20.0, scale=0.3, workspace=True,
             num_splits=12, merged=True)
    run_both([(900, 1), (40, 1)], 4, 1, 256, softcap=20.0, scale=0.3)


def test_split_merge_prefill_tiles():
    # Forced splits on a mixed batch: multi-row tiles (rows past one token) merge their partials too.
    run_both([(500, 7), (300, 1), (0, 40), (0, 0)], 9, 3, 64, num_splits=6, workspace=True, merged=True,
             pad_rows=1)


def test_counters_zero_after_calls():
    """Split-KV calls leave every arrival counter at zero (checked under the interpreter, where programs
    run one after another, and on a GPU), whatever the number of splits each tile used."""
    buf = counters(torch.zeros(0, device=DEV).device, 1 << 16)
    for splits in (2, 7, 33):
        run_both(LONG_DECODE, 14, 2, 64, num_splits=splits)
        assert int(buf.count_nonzero()) == 0
