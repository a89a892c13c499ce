"""GPU-only checks of the attention and small kernels: bf16 (broken in the interpreter), CUDA-graph
capture of a padded decode step with split-KV, and int64 offsets in a cache past 2^31 elements.
Skipped without CUDA (or when the interpreter is forced)."""

from __future__ import annotations

import os

import pytest
import torch

from kernels import reference as ref
from kernels.attention import attention_workspace, paged_attention, store_kv
from kernels.metadata import AttentionMetadata
from kernels.rope import rope_store_kv

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA GPU (compiled Triton)"),
]
BF16 = dict(rtol=2e-2, atol=2e-2)


def _batch(specs, nh, nkv, hd, dtype=torch.bfloat16, seed=0):
    from test_attention_triton import make_batch  # same builder as the interpreter tests

    return make_batch(specs, nh, nkv, hd, dtype, seed=seed)


@pytest.mark.parametrize("hd", [64, 128, 256])
@pytest.mark.parametrize("nh,nkv", [(9, 3), (14, 2), (8, 8)])
@pytest.mark.parametrize("splits", [None, 4])
def test_bf16_attention(hd, nh, nkv, splits):
    specs = [(0, 70), (300, 1), (0, 0), (33, 17), (1000, 1)]
    q, k, v, kc, vc, meta = _batch(specs, nh, nkv, hd)
    store_kv(k, v, kc, vc, meta.slot_mapping)
    for window, softcap in ((0, 0.0), (64, 0.0), (0, 30.0)):
        want = ref.paged_attention(q, kc, vc, meta, hd ** -0.5, window, softcap)
        got = paged_attention(q, kc, vc, meta, hd ** -0.5, window, softcap, num_splits=splits)
        torch.testing.assert_close(got, want, **BF16)


def test_bf16_small_kernels():
    from kernels.act import gelu_tanh_mul, silu_mul
    from kernels.norm import rms_norm
    from kernels.rope import rope

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 896, device="cuda", generator=g).bfloat16()
    r = torch.randn(37, 896, device="cuda", generator=g).bfloat16()
    w = torch.randn(896, device="cuda", generator=g)
    for got, want in zip(rms_norm(x, w, 1e-6, r), ref.rms_norm(x, w, 1e-6, r), strict=True):
        torch.testing.assert_close(got, want, **BF16)
    q = torch.randn(37, 14, 64, device="cuda", generator=g).bfloat16()
    kk = torch.randn(37, 2, 64, device="cuda", generator=g).bfloat16()
    pos = torch.randint(0, 4096, (37,), device="cuda", generator=g)
    cs = ref.rope_cache(1e6, 64, 4096, "cuda")
    for neox in (True, False):
        for got, want in zip(rope(q, kk, pos, cs, neox), ref.rope(q, kk, pos, cs, neox), strict=True):
            torch.testing.assert_close(got, want, **BF16)
    up = torch.randn(37, 4864, device="cuda", generator=g).bfloat16()
    gate = (3 * torch.randn(37, 4864, device="cuda", generator=g)).bfloat16()
    torch.testing.assert_close(silu_mul(gate, up), ref.silu_mul(gate, up), **BF16)
    torch.testing.assert_close(gelu_tanh_mul(gate, up), ref.gelu_tanh_mul(gate, up), **BF16)


def test_cuda_graph_decode_step_with_split_kv():
    """Capture rope_store_kv + split-KV attention once for a padded batch of 8, replay with other lengths (long
    contexts merge their splits in the last program; short ones use one split)."""
    nh, nkv, hd, bs, B, max_blocks = 8, 2, 64, 16, 8, 64
    dev = "cuda"
    kc = torch.zeros(B * max_blocks, bs, nkv, hd, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    g = torch.Generator(device=dev).manual_seed(1)
    kc.normal_(generator=g)
    vc.normal_(generator=g)
    perm = torch.randperm(B * max_blocks, device=dev, generator=g).int()
    meta = AttentionMetadata(
        slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=dev),
        block_tables=perm.view(B, max_blocks).contiguous(),
        seq_lens=torch.zeros(B, dtype=torch.int32, device=dev),
        cu_seqlens_q=torch.zeros(B + 1, dtype=torch.int32, device=dev),
        max_seqlen_q=1, max_seqlen_k=max_blocks * bs, block_size=bs)  # host ints: the graph's bucket
    q = torch.zeros(B, nh, hd, device=dev, dtype=torch.bfloat16)
    k = torch.zeros(B, nkv, hd, device=dev, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    out = torch.full_like(q, float("nan"))
    ws = attention_workspace(B, nh, hd, dev, num_splits=8)

    def fill(lens: list[int]) -> None:
        """Write one step's inputs into the static tensors in place (lens 0 = padded slot)."""
        n = len(lens)
        full = lens + [0] * (B - n)
        meta.seq_lens.copy_(torch.tensor(full, dtype=torch.int32))
        meta.cu_seqlens_q.copy_(torch.tensor([0] + [min(1, x) for x in full], dtype=torch.int32).cumsum(0))
        slots = [int(meta.block_tables[i, (L - 1) // bs]) * bs + (L - 1) % bs if L else -1 for i, L in enumerate(full)]
        meta.slot_mapping.copy_(torch.tensor(slots))
        pos.copy_(torch.tensor([max(x - 1, 0) for x in full]))
        q.normal_(generator=g)
        k.normal_(generator=g)
        v.normal_(generator=g)

    def ws_counters() -> torch.Tensor:
        from kernels.workspace import counters

        return counters(q.device, 1)

    pos = torch.zeros(B, dtype=torch.long, device=dev)
    cs = ref.rope_cache(10000.0, hd, max_blocks * bs, dev)
    qr = torch.empty_like(q)

    def step() -> None:  # the decode step's attention as engine/model.py runs it
        rope_store_kv(q, k, v, pos, cs, True, kc, vc, meta.slot_mapping, out=qr)
        paged_attention(qr, kc, vc, meta, hd ** -0.5, out=out, workspace=ws)

    fill([5, 100])
    step()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in ([7, 1000, 33], [1, 2, 3, 4, 5, 6, 7, 1024], [513]):
        fill(lens)
        out.fill_(float("nan"))
        ws.lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        live = sum(1 for x in lens if x)
        torch.testing.assert_close(qr, ref.rope(q, k, pos, cs, True)[0], **BF16)
        want = ref.paged_attention(qr, kc, vc, meta, hd ** -0.5)  # the graph already stored this step's K/V
        torch.testing.assert_close(out[:live], want[:live], **BF16)
        assert torch.isnan(out[live:]).all(), "padded rows must not be written"
        long_rows = [i for i, x in enumerate(lens) if x > 512]
        assert not torch.isnan(ws.lse[1, long_rows]).any(), "the captured step should use split-KV"
        assert not ws_counters().any(), "an arrival counter was left non-zero"


def test_int64_offsets_large_cache():
    """Blocks past 2^31 elements: any int32 offset arithmetic reads the wrong place."""
    nkv, hd, bs = 1, 128, 16
    per_block = bs * nkv * hd
    num_blocks = (1 << 31) // per_block + 64
    if torch.cuda.mem_get_info()[0] < 4 * num_blocks * per_block + (1 << 30):
        pytest.skip("not enough GPU memory for a 2^31-element cache")
    kc = torch.empty(num_blocks, bs, nkv, hd, device="cuda", dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    L = 40
    blocks = torch.arange(num_blocks - 3, num_blocks, device="cuda", dtype=torch.int32).flip(0)
    g = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(L, nkv, hd, device="cuda", generator=g).bfloat16()
    v = torch.randn(L, nkv, hd, device="cuda", generator=g).bfloat16()
    pos = torch.arange(L, device="cuda")
    slots = blocks.long()[pos // bs] * bs + pos % bs
    meta = AttentionMetadata(slots, blocks[None], torch.tensor([L], dtype=torch.int32, device="cuda"),
                             torch.tensor([0, L], dtype=torch.int32, device="cuda"), L, L, bs)
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[num_blocks - 1, :bs], k[:bs])
    q = torch.randn(L, 4, hd, device="cuda", generator=g).bfloat16()
    want = ref.paged_attention(q, kc, vc, meta, hd ** -0.5)
    torch.testing.assert_close(paged_attention(q, kc, vc, meta, hd ** -0.5), want, **BF16)
    del kc, vc
    torch.cuda.empty_cache()
