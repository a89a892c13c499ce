"""Embedding requests in the engine (tiny synthetic model, torch backend): the prefill-only path
frees every block, equals a direct forward pass pooled offline in every pooling mode, survives
chunking, preemption and batching with generating requests, and leaves their outputs unchanged."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from engine.config import GGUF_POOLING, EngineConfig, ModelConfig
from engine.core.async_engine import AsyncEngine
from engine.core.engine import ContextLengthError
from engine.core.pooling import PoolingParams, normalize, pool_hidden
from engine.core.sampling import SamplingParams
from kernels import AttentionMetadata
from tests.synth import SMOLLM2, load_tiny_model, make_engine

pytestmark = pytest.mark.skipif(not SMOLLM2.exists(), reason="needs the smollm2 tokenizer metadata")

GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny_model(tmp_path_factory.mktemp("synth"))


def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """The last layer's hidden states (after the final norm) of one whole prompt, run directly."""
    n, bs = len(ids), 16
    nblocks = -(-n // bs)
    kv = model.allocate_kv_cache(nblocks, bs)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(nblocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        max_seqlen_q=n, max_seqlen_k=n, block_size=bs)
    with torch.inference_mode():
        return model.forward(torch.tensor(ids), torch.arange(n), meta, kv).float()


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def close(a: list[list[float]], b: list[list[float]], tol: float = 1e-4) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "none"])
def test_pooling_modes_equal_direct_forward(loaded, pooling) -> None:
    eng = make_engine(loaded)
    ps = [ids_of(n, s) for s, n in enumerate((5, 23, 40))]
    got = eng.embed(ps, PoolingParams(pooling))
    for ids, vecs in zip(ps, got, strict=True):
        h = hidden_states(loaded.model, ids)
        want = {"mean": h.mean(0, keepdim=True), "cls": h[:1], "last": h[-1:], "none": h}[pooling]
        if pooling != "none":
            want = want / want.norm(dim=-1, keepdim=True)
            assert math.isclose(sum(x * x for x in vecs[0]), 1.0, rel_tol=1e-5)
        assert len(vecs) == (len(ids) if pooling == "none" else 1)
        assert close(vecs, want.tolist())
    assert eng.kv.num_free_blocks == eng.kv.num_blocks  # no KV kept after


def test_prefill_only_frees_blocks_and_uses_no_prefix_hits(loaded) -> None:
    eng = make_engine(loaded, num_blocks=32)
    ids = ids_of(70, 7)
    first = eng.embed([ids])[0]
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert not eng.has_unfinished() and not eng.scheduler.requests
    before = eng.num_computed_tokens_total
    again = eng.embed([ids])[0]  # its blocks sit in the prefix cache, yet every token is computed
    assert eng.num_computed_tokens_total - before == len(ids)
    assert close(first, again)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    st = eng.stats()
    assert st.embedding_requests_finished == 2 and st.requests_finished == 2 and st.num_running == 0


def test_chunked_prefill_pools_the_same(loaded) -> None:
    ids = ids_of(150, 3)
    whole = make_engine(loaded).embed([ids], PoolingParams("mean"))[0]
    chunked_eng = make_engine(loaded, max_num_batched_tokens=32)
    chunked = chunked_eng.embed([ids], PoolingParams("mean"))[0]
    assert close(whole, chunked)
    assert chunked_eng.kv.num_free_blocks == chunked_eng.kv.num_blocks


def test_batched_with_generation_keeps_outputs(loaded) -> None:
    gen_prompts = [ids_of(n, 100 + n) for n in (6, 17, 30)]
    alone = make_engine(loaded).generate(gen_prompts, GREEDY)
    emb_prompts = [ids_of(n, 200 + n) for n in (9, 33, 64, 3)]
    emb_alone = make_engine(loaded).embed(emb_prompts)
    eng = make_engine(loaded, max_num_seqs=8)
    for i, p in enumerate(gen_prompts):
        eng.add_request(f"g{i}", p, GREEDY)
    for i, p in enumerate(emb_prompts):
        eng.add_embedding_request(f"e{i}", p, PoolingParams("mean"))
    tokens: dict[str, list[int]] = {}
    embs: dict[str, list[list[float]]] = {}
    mixed_step = False
    while eng.has_unfinished():
        kinds = set()
        for out in eng.step():
            kinds.add(out.request_id[0])
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.embedding is not None:
                assert out.finished and out.finish_reason == "stop" and not out.token_ids
                embs[out.request_id] = out.embedding
        mixed_step |= kinds == {"g", "e"}
    assert mixed_step  # embeddings and generation shared steps
    assert [tokens[f"g{i}"] for i in range(3)] == [r.token_ids for r in alone]
    for i, want in enumerate(emb_alone):
        assert close(embs[f"e{i}"], want)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_preempted_embedding_is_recomputed(loaded) -> None:
    # a small pool: the running generators and long embedding inputs cannot all fit at once
    eng = make_engine(loaded, num_blocks=12, max_num_batched_tokens=48, max_model_len=128)
    ids = [ids_of(100, 300 + i) for i in range(2)]
    want = make_engine(loaded, max_model_len=128).embed(ids)
    for i in range(3):
        eng.add_request(f"g{i}", ids_of(20, 400 + i), SamplingParams(temperature=0, max_tokens=40))
    for i, p in enumerate(ids):
        eng.add_embedding_request(f"e{i}", p, PoolingParams())
    embs = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.embedding is not None:
                embs[out.request_id] = out.embedding
    assert eng.scheduler.num_preemptions > 0
    for i, w in enumerate(want):
        assert close(embs[f"e{i}"], w)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_abort_frees_blocks(loaded) -> None:
    eng = make_engine(loaded, max_num_batched_tokens=16)
    eng.add_embedding_request("e", ids_of(100, 9), PoolingParams())
    eng.step()
    assert eng.kv.num_free_blocks < eng.kv.num_blocks
    eng.abort_request("e")
    outs = eng.step()
    assert [(o.request_id, o.finish_reason, o.embedding) for o in outs] == [("e", "abort", None)]
    assert eng.kv.num_free_blocks == eng.kv.num_blocks and not eng.has_unfinished()


def test_context_limit_and_bad_ids(loaded) -> None:
    eng = make_engine(loaded, max_model_len=64)
    eng.add_embedding_request("fits", ids_of(64, 1), PoolingParams())  # the whole context, no room needed
    with pytest.raises(ContextLengthError):
        eng.add_embedding_request("long", ids_of(65, 1), PoolingParams())
    with pytest.raises(ValueError):
        eng.add_embedding_request("empty", [], PoolingParams())
    with pytest.raises(ValueError):
        eng.add_embedding_request("oov", [10**7], PoolingParams())


def test_dimensions_and_normalize_modes() -> None:
    h = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    full = pool_hidden(h, PoolingParams("mean", normalize=-1))[0]
    assert close([full], h.mean(0, keepdim=True).tolist())
    short = torch.tensor(pool_hidden(h, PoolingParams("mean", dimensions=8))[0])
    want = h.mean(0)[:8]
    assert torch.allclose(short, want / want.norm(), atol=1e-6)
    assert abs(float(torch.tensor(pool_hidden(h, PoolingParams("last", normalize=0))[0]).abs().max()) - 32760) < 1e-2
    taxi = torch.tensor(pool_hidden(h, PoolingParams("cls", normalize=1))[0])
    assert torch.allclose(taxi.abs().sum(), torch.tensor(1.0))
    p3 = normalize(h[:1], 3)
    assert torch.allclose(p3.abs().pow(3).sum(), torch.tensor(1.0), atol=1e-5)
    assert normalize(torch.zeros(1, 4), 2).tolist() == [[0.0] * 4]  # a zero vector stays zero
    none = pool_hidden(h, PoolingParams("none", dimensions=4))
    assert close(none, h[:, :4].tolist())  # rows: truncated, never normalised
    with pytest.raises(ValueError):
        PoolingParams("max")


def test_default_pooling_from_gguf_key() -> None:
    base = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.block_count": 1, "llama.feed_forward_length": 128}
    assert ModelConfig.from_gguf(base).pooling == "mean"
    for code, name in GGUF_POOLING.items():
        assert ModelConfig.from_gguf({**base, "llama.pooling_type": code}).pooling == name
    assert ModelConfig.from_gguf({**base, "llama.pooling_type": 4}).pooling == "mean"  # rank: unsupported


def test_async_submit_embedding(loaded) -> None:
    async def main() -> None:
        eng = AsyncEngine(EngineConfig(model=str(loaded.path), device="cpu", cuda_graphs=False, max_model_len=128,
                                       pooling="last"), loaded)
        eng.start()
        while not eng.ready:
            await asyncio.sleep(0.01)
        assert eng.default_pooling == "last"
        ids = ids_of(30, 11)
        stream = eng.submit_embedding(ids, PoolingParams(eng.default_pooling))
        outs = [o async for o in stream]
        assert len(outs) == 1 and outs[0].finished and len(outs[0].embedding) == 1
        h = hidden_states(loaded.model, ids)[-1]
        assert close(outs[0].embedding, [(h / h.norm()).tolist()])
        with pytest.raises(ContextLengthError):
            eng.submit_embedding(ids_of(129, 1), PoolingParams())
        assert eng.stats().free_blocks == eng.stats().total_blocks
        await eng.shutdown()

    asyncio.run(main())
