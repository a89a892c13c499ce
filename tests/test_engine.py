"""The whole engine on a tiny synthetic GGUF model (torch backend): scheduling, prefix cache,
preemption, stops, seeds, prompt logprobs, aborts, errors, and the async front."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.config import EngineConfig
from engine.core.async_engine import AsyncEngine
from engine.core.engine import ContextLengthError, LLMEngine
from engine.core.sampling import SamplingParams
from tests.synth import SMOLLM2, load_tiny_model, make_engine, write_tiny_model

pytestmark = pytest.mark.skipif(not SMOLLM2.exists(), reason="needs the smollm2 tokenizer metadata")

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny_model(tmp_path_factory.mktemp("synth"))


def prompts(n: int, lo: int = 5, hi: int = 30, seed: int = 0, vocab: int = 40000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def alone(loaded, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    eng = make_engine(loaded, max_num_seqs=1, enable_prefix_caching=False)
    return eng.generate([prompt], params)[0].token_ids


def test_generate_batch_matches_alone(loaded) -> None:
    ps = prompts(6)
    res = make_engine(loaded, max_num_seqs=8).generate(ps, GREEDY)
    for r, p in zip(res, ps):
        assert r.finish_reason == "length" and len(r.token_ids) == 12
        assert r.token_ids == alone(loaded, p)
        assert r.text == loaded.tokenizer.decode(r.token_ids, skip_special=True)


def test_shared_prefix_computes_only_new_tokens(loaded) -> None:
    prefix = prompts(1, 80, 81, seed=5)[0]
    a, b = prefix + [500, 501, 502], prefix + [900, 901]
    eng = make_engine(loaded)
    out_a = eng.generate([a], GREEDY)[0]
    before = eng.num_computed_tokens_total
    out_b = eng.generate([b], GREEDY)[0]
    assert out_b.metrics.cached_prompt_tokens == 80  # five full blocks of 16
    assert eng.num_computed_tokens_total - before == len(b) - 80 + 11  # 12 sampled, the last not fed back
    assert eng.stats().prefix_cache_hit_tokens == 80
    assert out_b.token_ids == alone(loaded, b) and out_a.token_ids == alone(loaded, a)


def test_32_requests_with_room_for_4_all_match_alone(loaded) -> None:
    ps = prompts(32, 10, 30, seed=1)
    params = SamplingParams(temperature=0, max_tokens=16)
    eng = make_engine(loaded, num_blocks=12, max_num_seqs=32, max_model_len=128)  # 192 tokens of KV
    res = eng.generate(ps, params)
    assert eng.scheduler.num_preemptions > 0
    for r, p in zip(res, ps):
        assert r.finish_reason == "length" and r.token_ids == alone(loaded, p, params)
    assert eng.kv.num_free_blocks == 12 and all(b.ref_count == 0 for b in eng.kv.blocks)


def test_chunked_prefill_matches_and_prompt_logprobs(loaded) -> None:
    p = prompts(1, 50, 51, seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, logprobs=3)
    whole = make_engine(loaded).generate([p], params)[0]
    chunked = make_engine(loaded, max_num_seqs=1, max_num_batched_tokens=7).generate([p], params)[0]
    assert chunked.token_ids == whole.token_ids
    assert len(whole.prompt_logprobs) == len(p) and whole.prompt_logprobs[0] is None
    for x, y, tok in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:], p[1:]):
        assert x.token_id == tok == y.token_id and abs(x.logprob - y.logprob) < 1e-4 and len(x.top) == 2
    assert [lp.token_id for lp in whole.logprobs] == whole.token_ids
    assert all(lp.top[0][1] >= lp.logprob for lp in whole.logprobs)  # greedy takes the best token


def test_seeded_sampling_ignores_batch_company(loaded) -> None:
    ps = prompts(4, seed=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10)
    ref = alone(loaded, ps[0], seeded)
    others = [SamplingParams(temperature=1.0, max_tokens=7), GREEDY, SamplingParams(temperature=0.5, seed=9, max_tokens=10)]
    res = make_engine(loaded, max_num_seqs=4).generate(ps, [seeded] + others)
    assert res[0].token_ids == ref
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=10)
    assert alone(loaded, ps[0], other_seed) != ref


def test_stop_strings_stop_ids_and_eos(loaded) -> None:
    p = prompts(1, seed=4)[0]
    full = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=20))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = full.text.index(stop)
    r = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    assert (r.text, r.finish_reason, r.stop_reason) == (full.text[:cut], "stop", stop)
    r = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                         include_stop_str_in_output=True))[0]
    assert r.text == full.text[: cut + len(stop)]
    tok = full.token_ids[5]
    r = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]))[0]
    assert r.token_ids == full.token_ids[: full.token_ids.index(tok) + 1] and r.stop_reason == tok
    eog = next(iter(loaded.tokenizer.eog_ids))
    r = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=5, logit_bias={eog: 100.0}))[0]
    assert r.token_ids == [eog] and r.finish_reason == "stop" and r.text == ""
    r = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=5, logit_bias={eog: 100.0},
                                                         min_tokens=2))[0]
    assert len(r.token_ids) == 3 and r.token_ids[-1] == eog
    r = make_engine(loaded).generate([p], SamplingParams(temperature=0, max_tokens=5, logit_bias={eog: 100.0},
                                                         ignore_eos=True))[0]
    assert r.token_ids == [eog] * 5 and r.finish_reason == "length"


def test_context_length_is_checked_before_work(loaded) -> None:
    eng = make_engine(loaded, max_model_len=64)
    with pytest.raises(ContextLengthError) as e:
        eng.add_request("x", list(range(100, 160)), SamplingParams(max_tokens=10))
    assert (e.value.prompt_tokens, e.value.max_tokens, e.value.context_length) == (60, 10, 64)
    assert not eng.has_unfinished()
    r = eng.generate([list(range(100, 160))], SamplingParams(temperature=0, max_tokens=None))[0]
    assert len(r.token_ids) == 4 and r.finish_reason == "length"  # max_tokens None: up to the context


def test_abort_frees_blocks_and_reports(loaded) -> None:
    eng = make_engine(loaded)
    for i, p in enumerate(prompts(3)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=50))
    eng.step()
    eng.step()
    eng.abort_request("r1")
    outs = eng.step()
    aborted = [o for o in outs if o.request_id == "r1"]
    assert aborted[0].finished and aborted[0].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


class Broken:
    def fill_mask(self, row) -> None:
        raise RuntimeError("bad grammar")

    def accept(self, token_id: int) -> None: ...

    def is_terminated(self) -> bool:
        return False


def test_one_failing_request_does_not_stop_the_others(loaded) -> None:
    ps = prompts(3, seed=6)
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=12, grammar=Broken()), GREEDY]
    res = make_engine(loaded).generate(ps, params)
    assert res[1].finish_reason == "error" and "bad grammar" in res[1].error
    assert res[0].token_ids == alone(loaded, ps[0]) and res[2].token_ids == alone(loaded, ps[2])


def test_async_engine_concurrent_cancel_and_shutdown(loaded) -> None:
    cfg = EngineConfig(model=str(loaded.path), device="cpu", max_model_len=256, kv_cache_gib=0.01)
    ps = prompts(4, seed=7)

    async def collect(eng: AsyncEngine, p: list[int], rid: str) -> tuple[list[int], str, str]:
        toks, text, reason = [], "", None
        async for out in eng.generate(p, GREEDY, rid):
            toks += out.token_ids
            text += out.text
            reason = out.finish_reason
        return toks, text, reason

    async def main() -> None:
        eng = AsyncEngine(cfg, loaded)
        eng.start()
        while not eng.ready:
            await asyncio.sleep(0.01)
        assert eng.kv_capacity_tokens > 0 and eng.config.max_model_len == 256
        results = await asyncio.gather(*(collect(eng, p, f"a{i}") for i, p in enumerate(ps)))
        for (toks, text, reason), p in zip(results, ps):
            assert toks == alone(loaded, p) and reason == "length"
            assert text == loaded.tokenizer.decode(toks, skip_special=True)
        with pytest.raises(ContextLengthError):
            await eng.generate(list(range(300)), GREEDY).__anext__()
        # a client that goes away: its request is aborted and its blocks come back
        gen = eng.generate(ps[0], SamplingParams(temperature=0, max_tokens=200), "gone")
        await gen.__anext__()
        await gen.aclose()
        for _ in range(200):
            if eng.stats().num_running == 0 and eng.stats().free_blocks == eng.stats().total_blocks:
                break
            await asyncio.sleep(0.01)
        s = eng.stats()
        assert s.num_running == 0 and s.free_blocks == s.total_blocks and s.requests_finished == 5
        await eng.shutdown(grace_s=1)
        assert not eng._thread.is_alive()

    asyncio.run(main())


# ---- the real smollm2 ---------------------------------------------------------------------------
# On CPU the forward pass is fp32; batching changes only the shapes of the matmuls (reduction order),
# which moves logits by ~1e-5. So tokens must match exactly unless the alone run had a near tie
# (top-2 logprob gap < TIE), and every compared logprob must agree within LP_TOL.
TIE, LP_TOL = 1e-3, 1e-3


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from engine.loading.loader import load_model

    return load_model(EngineConfig(model=str(smollm2_path), device="cpu", max_model_len=256))


def test_smollm2_8_concurrent_match_alone(smollm2) -> None:
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
             "The best way to learn", "Water boils at", "import numpy as", "My favourite colour is"]
    ps = [smollm2.tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    batched = make_engine(smollm2, max_num_seqs=8).generate(ps, params)
    single = make_engine(smollm2, max_num_seqs=1)
    for p, b in zip(ps, batched):
        a = single.generate([p], params)[0]
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            la, lb = a.logprobs[i], b.logprobs[i]
            if ta != tb:
                assert la.top[0][1] - la.top[1][1] < TIE, f"diverged at {i} without a near tie"
                break
            assert abs(la.logprob - lb.logprob) < LP_TOL
    assert any("Paris" in r.text for r in batched)


# ---- the Triton backend -------------------------------------------------------------------------
def _missing_kernels() -> list[str]:
    import importlib.util

    mods = ("qmatmul", "attention", "norm", "rope", "act", "dequant")
    return [m for m in mods if importlib.util.find_spec(f"kernels.{m}") is None]


@pytest.mark.skipif(bool(_missing_kernels()), reason=f"Triton kernel modules not written yet: {_missing_kernels()}")
@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_1"])
def test_triton_backend_runs_the_engine(tmp_path, weight_type: str) -> None:
    """Whole engine on the Triton ops (interpreter on CPU, compiled on CUDA, where the decode steps
    also replay CUDA graphs) vs the torch reference backend: same greedy tokens, logprobs within tolerance
    (fp32 in the interpreter: 1e-3; bf16 activations on a GPU: 0.1)."""
    import torch

    from engine.loading.loader import load_model

    # a 1024-token vocabulary: the interpreter needs ~1 min per 49152-row output matmul
    path = write_tiny_model(tmp_path / "t.gguf", weight_type=weight_type, n_layers=1, vocab_size=1024)
    device, tol = ("cuda", 0.1) if torch.cuda.is_available() else ("triton", 1e-3)
    ps = prompts(2, 5, 9, seed=8, vocab=1024)
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=3, prompt_logprobs=3)
    results = {}
    for dev in ("cpu", device):  # the reference: the dense fp32 torch ops
        cfg = EngineConfig(model=str(path), device=dev, max_model_len=64, max_num_seqs=2, cpu_weights="exact")
        results[dev] = LLMEngine(cfg, load_model(cfg), num_blocks=16).generate(ps, params)
    for ref, got in zip(results["cpu"], results[device]):
        assert got.token_ids == ref.token_ids
        for a, b in zip(ref.logprobs + ref.prompt_logprobs[1:], got.logprobs + got.prompt_logprobs[1:]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < tol
            assert [t for t, _ in a.top[:1]] == [t for t, _ in b.top[:1]]


def test_async_engine_overload_and_load_failure(loaded, tmp_path) -> None:
    from engine.core.engine import EngineDeadError, EngineOverloadedError

    async def main() -> None:
        cfg = EngineConfig(model=str(loaded.path), device="cpu", max_model_len=256, max_num_seqs=1, kv_cache_gib=0.01)
        eng = AsyncEngine(cfg, loaded, max_waiting=1)
        with pytest.raises(EngineOverloadedError):  # not loaded yet
            await eng.generate([1, 2], GREEDY).__anext__()
        eng.start()
        while not eng.ready:
            await asyncio.sleep(0.01)
        long = SamplingParams(temperature=0, max_tokens=100)
        g1, g2 = eng.generate([300, 301], long), eng.generate([302, 303], long)
        await g1.__anext__()
        await g2.__anext__()  # one running + one waiting: the queue is full
        with pytest.raises(EngineOverloadedError):
            await eng.generate([304], GREEDY).__anext__()
        await g1.aclose()
        await g2.aclose()
        await eng.shutdown()
        with pytest.raises(EngineDeadError):
            await eng.generate([1, 2], GREEDY).__anext__()

        bad = AsyncEngine(EngineConfig(model=str(tmp_path / "missing.gguf"), device="cpu"))
        bad.start()
        bad._thread.join(30)
        assert bad.load_error and not bad.ready
        with pytest.raises(EngineDeadError):
            await bad.generate([1, 2], GREEDY).__anext__()

    asyncio.run(main())
