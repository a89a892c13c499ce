"""Scheduler + block pool without a model.

A fake runner stands in for the model: it writes each computed token into its KV slot (through the
block table, as the real runner does) and "samples" the next token as a hash of everything it reads
back through the block table. Any mistake in block tables, sharing, eviction or recompute changes
the read-back prefix and so the output.
"""

from __future__ import annotations

import random

import pytest

from engine.core.kv_cache import KVCacheManager
from engine.core.sampling import SamplingParams
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus

BS = 4


class FakeRunner:
    def __init__(self, num_blocks: int) -> None:
        self.slots: list[int | None] = [None] * (num_blocks * BS)
        self.computed = 0

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for seq, n in zip(out.seqs, out.num_new_tokens):
            start = seq.num_computed_tokens
            for p in range(start, start + n):
                self.slots[seq.block_table[p // BS] * BS + p % BS] = seq.token_ids[p]
            self.computed += n
            if start + n == seq.num_tokens:
                seen = tuple(self.slots[seq.block_table[p // BS] * BS + p % BS] for p in range(start + n))
                assert seen == tuple(seq.token_ids), "KV read back through the block table differs"
                sampled[seq.request_id] = hash(seen) % 1000
        return sampled


def run(scheduler: Scheduler, runner: FakeRunner, seqs: list[Sequence], on_step=None) -> dict[str, list[int]]:
    for s in seqs:
        scheduler.add(s)
    done: dict[str, list[int]] = {}
    steps = 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        if on_step:
            on_step(out)
        for s in out.aborted:
            done[s.request_id] = None
        sampled = runner.execute(out)
        scheduler.update(out)
        for s in out.seqs:
            if s.request_id in sampled:
                s.append_token(sampled[s.request_id])
                if s.num_output_tokens >= s.max_tokens:
                    done[s.request_id] = s.output_token_ids
                    scheduler.finish(s, "length")
        steps += 1
        assert steps < 10_000
    return done


def make(rid: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), max_tokens)


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    kv = KVCacheManager(64, BS)
    return run(Scheduler(kv, 1, 64), FakeRunner(64), [make("x", prompt, max_tokens)])["x"]


def test_budget_and_slots_are_respected() -> None:
    kv = KVCacheManager(200, BS)
    sched = Scheduler(kv, max_num_seqs=3, max_num_batched_tokens=10)
    rng = random.Random(0)
    seqs = [make(f"r{i}", [rng.randrange(100) for _ in range(rng.randrange(1, 25))], 5) for i in range(8)]

    def check(out: SchedulerOutput) -> None:
        assert out.total_tokens <= 10
        assert len(sched.running) <= 3
        assert all(n > 0 for n in out.num_new_tokens)

    done = run(sched, FakeRunner(200), seqs, check)
    assert all(done[s.request_id] == alone(s.prompt_token_ids, 5) for s in seqs)
    assert kv.num_free_blocks == kv.num_blocks


def test_chunked_prefill_keeps_decoders_flowing() -> None:
    kv = KVCacheManager(100, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=8)
    short = make("short", [1, 2, 3], 30)
    long = make("long", list(range(100, 160)), 2)
    sched.add(short)
    sched.update(sched.schedule())
    short.append_token(7)
    sched.add(long)
    for _ in range(5):  # the 60-token prompt needs 8+ steps at <= 7 tokens each
        out = sched.schedule()
        assert out.seqs[0] is short and out.num_new_tokens[0] == 1  # the decoder goes first
        assert out.seqs[1] is long and out.num_new_tokens[1] == 7  # the prompt gets the rest
        sched.update(out)
        short.append_token(7)
    assert long.num_computed_tokens == 35


def test_fcfs_head_of_queue_is_not_skipped() -> None:
    kv = KVCacheManager(6, BS)  # 24 tokens
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    big, small = make("big", list(range(30)), 1), make("small", [1, 2], 1)
    sched.add(make("first", list(range(10)), 50))
    sched.schedule()
    sched.add(big)
    sched.add(small)
    out = sched.schedule()
    assert small not in out.seqs  # it would fit, but "big" arrived first


def test_preemption_under_a_tiny_pool_keeps_outputs() -> None:
    """32 requests, KV room for about 4 at a time: all finish, outputs as when run alone."""
    rng = random.Random(1)
    prompts = [[rng.randrange(100) for _ in range(rng.randrange(3, 12))] for _ in range(32)]
    kv = KVCacheManager(20, BS)  # 80 tokens; each request needs up to ~20
    sched = Scheduler(kv, max_num_seqs=32, max_num_batched_tokens=64)
    seqs = [make(f"r{i}", p, 8) for i, p in enumerate(prompts)]
    done = run(sched, FakeRunner(20), seqs)
    assert sched.num_preemptions > 0
    for s, p in zip(seqs, prompts):
        assert done[s.request_id] == alone(p, 8)
    assert kv.num_free_blocks == kv.num_blocks and all(b.ref_count == 0 for b in kv.blocks)


def test_preempts_the_newest_running_sequence() -> None:
    kv = KVCacheManager(5, BS)  # one block stays free at admission (the watermark)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make("a", [1] * 7, 10), make("b", [2] * 7, 10)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # both admitted, 2 blocks each
    assert out.seqs == [a, b]
    sched.update(out)
    a.append_token(5)
    b.append_token(5)
    out = sched.schedule()  # position 7 still fits in the second block
    sched.update(out)
    a.append_token(5)
    b.append_token(5)
    out = sched.schedule()  # position 8: a takes the last block, b (newest) is preempted
    assert out.seqs == [a] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b and b.metrics.preemptions == 1


def test_abort_frees_blocks_at_the_next_step() -> None:
    kv = KVCacheManager(20, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a, w = make("a", list(range(10)), 10), make("w", [1, 2], 10)
    sched.add(a)
    sched.update(sched.schedule())
    sched.abort("a")
    assert kv.num_free_blocks < kv.num_blocks  # nothing freed until the next step
    sched.add(w)
    sched.abort("w")  # aborting a waiting request works too
    out = sched.schedule()
    assert {s.request_id for s in out.aborted} == {"a", "w"} and out.is_empty
    assert a.finish_reason == "abort" and kv.num_free_blocks == kv.num_blocks
    assert not sched.has_unfinished()


def test_shared_prefix_computes_only_new_tokens() -> None:
    kv = KVCacheManager(64, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(64)
    prefix = list(range(40))
    first = run(sched, runner, [make("a", prefix + [1, 2], 4)])["a"]
    before = runner.computed
    b = make("b", prefix + [3, 4], 4)
    out_b = run(sched, runner, [b])["b"]
    assert b.metrics.cached_prompt_tokens == 40
    assert runner.computed - before == 2 + 3  # 2 new prompt tokens + 3 decode steps (4th token not fed)
    assert out_b == alone(prefix + [3, 4], 4) and first == alone(prefix + [1, 2], 4)


@pytest.mark.parametrize("seed", range(4))
def test_random_arrivals_aborts_and_tiny_pool(seed: int) -> None:
    rng = random.Random(seed)
    kv = KVCacheManager(12, BS)
    sched = Scheduler(kv, max_num_seqs=6, max_num_batched_tokens=16)
    runner = FakeRunner(12)
    prefix = [rng.randrange(100) for _ in range(9)]
    expected, finished, aborted = {}, {}, set()
    live: dict[str, Sequence] = {}
    for i in range(300):
        if i < 150 and rng.random() < 0.3:
            p = (prefix if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randrange(1, 8))]
            s = make(f"r{i}", p, rng.randrange(1, 10))
            expected[s.request_id] = alone(p, s.max_tokens)
            live[s.request_id] = s
            sched.add(s)
        if live and rng.random() < 0.05:
            rid = rng.choice(sorted(live))
            sched.abort(rid)
            aborted.add(rid)
        out = sched.schedule()
        for s in out.aborted:
            live.pop(s.request_id)
        sampled = runner.execute(out)
        sched.update(out)
        for s in out.seqs:
            if s.request_id in sampled:
                s.append_token(sampled[s.request_id])
                if s.num_output_tokens >= s.max_tokens:
                    finished[s.request_id] = s.output_token_ids
                    live.pop(s.request_id)
                    sched.finish(s, "length")
        owned = [b for s in sched.running for b in s.block_table]
        assert sum(b.ref_count for b in kv.blocks) == len(owned)
        assert all(not s.block_table for s in sched.waiting)
    while sched.has_unfinished():
        out = sched.schedule()
        sampled = runner.execute(out)
        sched.update(out)
        for s in out.seqs:
            if s.request_id in sampled:
                s.append_token(sampled[s.request_id])
                if s.num_output_tokens >= s.max_tokens:
                    finished[s.request_id] = s.output_token_ids
                    sched.finish(s, "length")
    for rid, toks in finished.items():
        assert toks == expected[rid]
    assert set(finished) | aborted == set(expected)
    assert kv.num_free_blocks == kv.num_blocks


def _step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    """One schedule + fake forward + token append (no finishing)."""
    out = scheduler.schedule()
    sampled = runner.execute(out)
    scheduler.update(out)
    for s in out.seqs:
        if s.request_id in sampled:
            s.append_token(sampled[s.request_id])
    return out


def test_one_request_gets_its_share_of_slots_not_all() -> None:
    """n=16 choices (one group) on 8 slots run 8 at a time while alone; a second request that
    arrives gets a slot within one step (a choice of the first is preempted), and the first keeps
    the rest. Outputs stay exactly what they are alone (preemption is recompute)."""
    kv = KVCacheManager(256, BS)
    sched, runner = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64), FakeRunner(256)
    big = [Sequence(f"big-{i}", [1, 2, 3], SamplingParams(max_tokens=50), 50, group="big") for i in range(16)]
    for s in big:
        sched.add(s)
    for _ in range(3):
        _step(sched, runner)
    assert len(sched.running) == 8 and {s.group for s in sched.running} == {"big"}
    small = make("small", [7, 8, 9], 5)
    sched.add(small)
    out = _step(sched, runner)
    assert small in sched.running and small in out.seqs
    assert sum(s.group == "big" for s in sched.running) == 7 and len(out.preempted) == 1
    for _ in range(3):  # steady state: no more preemption while the small one is at its share
        assert not _step(sched, runner).preempted


def test_shares_split_slots_between_requests() -> None:
    kv = KVCacheManager(256, BS)
    sched, runner = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64), FakeRunner(256)
    for g in ("a", "b"):
        for i in range(8):
            sched.add(Sequence(f"{g}{i}", [1, 2, 3, i], SamplingParams(max_tokens=99), 99, group=g))
    for _ in range(12):
        _step(sched, runner)
    held = [s.group for s in sched.running]
    assert len(held) == 8 and held.count("a") == 4 and held.count("b") == 4


def test_prompt_chunks_are_capped_while_others_decode() -> None:
    kv = KVCacheManager(512, BS)
    sched, runner = Scheduler(kv, 4, max_num_batched_tokens=512, long_prefill_tokens=32), FakeRunner(512)
    dec = make("dec", [1, 2, 3], 200)
    sched.add(dec)
    _step(sched, runner)  # prefill alone: whole prompt
    sched.add(make("long", list(range(1, 300)), 1))
    sizes = []
    while sched.requests["long"].num_computed_tokens < 299:
        out = _step(sched, runner)
        assert dec in out.seqs, "the decoder was skipped"
        sizes.append(out.num_new_tokens[out.seqs.index(sched.requests["long"])])
    assert max(sizes) == 32 and len(sizes) == 10  # 299 tokens in chunks of at most 32
    lone = Scheduler(KVCacheManager(512, BS), 4, max_num_batched_tokens=512, long_prefill_tokens=32)
    lone.add(make("long", list(range(1, 300)), 1))
    assert lone.schedule().num_new_tokens == [299]  # nothing decodes: the whole budget


def test_unchunked_prefill_grants_prompts_whole() -> None:
    """Encoders (chunked_prefill=False): a prompt is admitted only when all of it fits the step's
    budget; the others wait in arrival order and each is granted whole in a later step."""
    from engine.core.pooling import PoolingParams

    kv = KVCacheManager(64, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=10, chunked_prefill=False)
    lens = [6, 6, 3, 10]
    seqs = [Sequence(f"e{i}", list(range(1, n + 1)), SamplingParams(max_tokens=None), 0, pooling=PoolingParams())
            for i, n in enumerate(lens)]
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.has_unfinished():
        out = sched.schedule()
        steps.append([(s.request_id, n) for s, n in zip(out.seqs, out.num_new_tokens)])
        for s, n in zip(out.seqs, out.num_new_tokens):
            assert n == s.num_tokens  # never a chunk
        sched.update(out)
        for s in list(out.seqs):
            sched.finish(s, "stop")
    assert steps == [[("e0", 6)], [("e1", 6), ("e2", 3)], [("e3", 10)]]
