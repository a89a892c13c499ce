"""Block pool: allocation, sharing through the prefix cache, LRU eviction, invariants under random load."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from engine.core.kv_cache import KVCacheManager, num_blocks_for_budget


@dataclass(eq=False)
class Seq:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


def admit(kv: KVCacheManager, seq: Seq) -> bool:
    """What the scheduler does: take the cached prefix, allocate the rest, mark it computed."""
    hits = kv.get_computed_blocks(seq)
    cached = len(hits) * kv.block_size
    if not kv.allocate(seq, len(seq.token_ids) - cached, hits):
        return False
    seq.num_computed_tokens = len(seq.token_ids)
    kv.cache_full_blocks(seq)
    return True


def check_invariants(kv: KVCacheManager, live: list[Seq]) -> None:
    owners = Counter(b for s in live for b in s.block_table)
    for b in kv.blocks:
        assert b.ref_count == owners.get(b.block_id, 0), f"block {b.block_id} ref count"
        assert (b.ref_count == 0) == (b.block_id in kv.free_queue)
    for s in live:  # within one sequence a block appears once
        assert len(set(s.block_table)) == len(s.block_table)
        assert len(s.block_table) == kv.blocks_needed(s.num_computed_tokens)
    for h, bid in kv.cached.items():
        assert kv.blocks[bid].hash == h


def test_budget_to_blocks() -> None:
    # smollm2: 30 layers x 3 kv heads x 64 dims x 2 (k, v) x 4 bytes = 46080 B per token
    assert num_blocks_for_budget(2**30, 16, 46080) == 2**30 // (16 * 46080)
    assert num_blocks_for_budget(100, 16, 46080) == 0


def test_allocate_and_free_returns_everything() -> None:
    kv = KVCacheManager(8, 4)
    s = Seq(list(range(10)))
    assert admit(kv, s)
    assert len(s.block_table) == 3 and kv.num_free_blocks == 5
    kv.free(s)
    assert kv.num_free_blocks == 8 and s.block_table == []
    assert all(b.ref_count == 0 for b in kv.blocks)


def test_allocation_fails_without_side_effects() -> None:
    kv = KVCacheManager(2, 4)
    s = Seq(list(range(12)))
    assert not kv.allocate(s, 12)
    assert s.block_table == [] and kv.num_free_blocks == 2


def test_prefix_hit_reuses_the_same_blocks() -> None:
    kv = KVCacheManager(16, 4)
    a = Seq(list(range(10)) + [100, 101])
    b = Seq(list(range(10)) + [200, 201])
    admit(kv, a)
    hits = kv.get_computed_blocks(b)
    assert hits == a.block_table[:2]  # 8 shared tokens = 2 full blocks; the third block differs
    admit(kv, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert kv.blocks[a.block_table[0]].ref_count == 2
    check_invariants(kv, [a, b])


def test_freed_blocks_keep_their_hash_until_evicted() -> None:
    kv = KVCacheManager(4, 4)
    a = Seq(list(range(9)))
    admit(kv, a)
    first = list(a.block_table)
    kv.free(a)
    b = Seq(list(range(9)))
    assert kv.get_computed_blocks(b) == first[:2]
    admit(kv, b)
    assert b.block_table[:2] == first[:2]
    kv.free(b)
    # a different workload that needs the whole pool evicts the cached blocks
    c = Seq([7] * 16)
    admit(kv, c)
    assert kv.get_computed_blocks(Seq(list(range(9)))) == []
    check_invariants(kv, [c])


def test_lru_evicts_least_recently_freed_first() -> None:
    kv = KVCacheManager(4, 4)
    a, b = Seq([1] * 5), Seq([2] * 5)  # one full block each (+1 partial)
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    kv.free(b)  # a's full block is older in the LRU queue than b's
    admit(kv, Seq([3] * 12))  # needs 3 blocks: the two partial blocks go first, then a's full block
    assert kv.get_computed_blocks(Seq([1] * 5)) == []
    assert len(kv.get_computed_blocks(Seq([2] * 5))) == 1


def test_last_token_is_never_a_hit() -> None:
    kv = KVCacheManager(8, 4)
    admit(kv, Seq(list(range(8))))
    assert len(kv.get_computed_blocks(Seq(list(range(8))))) == 1  # 7 usable tokens -> 1 full block


def test_identical_content_published_twice_keeps_one_entry() -> None:
    kv = KVCacheManager(8, 4)
    a, b = Seq(list(range(5))), Seq(list(range(5)))
    kv.allocate(a, 5)
    kv.allocate(b, 5)  # both computed before either published
    a.num_computed_tokens = b.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    kv.cache_full_blocks(b)
    assert len(kv.cached) == 1
    check_invariants(kv, [a, b])


def test_prefix_caching_off() -> None:
    kv = KVCacheManager(8, 4, enable_prefix_caching=False)
    admit(kv, Seq(list(range(9))))
    assert kv.get_computed_blocks(Seq(list(range(9)))) == [] and not kv.cached


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_invariants(seed: int) -> None:
    """Admissions with shared prefixes, decode growth, preemption (free + recompute) and aborts."""
    rng = random.Random(seed)
    kv = KVCacheManager(40, 4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    live: list[Seq] = []
    waiting: list[Seq] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            waiting.append(Seq(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]))
        if op < 0.5 and waiting:
            s = waiting[0]
            if admit(kv, s):
                live.append(waiting.pop(0))
        elif op < 0.8 and live:  # decode one token; on exhaustion preempt the newest
            s = rng.choice(live)
            s.token_ids.append(rng.randrange(50))
            while not kv.allocate(s, 1):
                victim = live.pop()
                kv.free(victim)
                victim.num_computed_tokens = 0
                waiting.insert(0, victim)
                if victim is s:
                    break
            else:
                s.num_computed_tokens += 1
                kv.cache_full_blocks(s)
        elif live:  # finish or abort
            s = live.pop(rng.randrange(len(live)))
            kv.free(s)
        check_invariants(kv, live)
    for s in live:
        kv.free(s)
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)


def test_hits_survive_random_churn() -> None:
    """A prefix computed once and freed is found again as long as nothing needed its blocks."""
    kv = KVCacheManager(64, 4)
    base = list(range(32))
    a = Seq(base + [1])
    admit(kv, a)
    kv.free(a)
    for i in range(5):
        s = Seq([1000 + i] * 6)
        admit(kv, s)
        kv.free(s)
    hits = kv.get_computed_blocks(Seq(base + [2]))
    assert len(hits) == 8


def test_block_hash_is_a_chained_cryptographic_digest() -> None:
    """128-bit BLAKE2b over parent digest + token ids: no crafted prompt can collide with another
    user's cached prefix the way Python's 64-bit hash() allowed (vLLM's CVE-2025-25183)."""
    from engine.core.kv_cache import block_hash

    a = block_hash(None, (1, 2, 3, 4))
    assert isinstance(a, bytes) and len(a) == 16
    assert block_hash(None, (1, 2, 3, 4)) == a
    assert block_hash(a, (5, 6, 7, 8)) != block_hash(None, (5, 6, 7, 8))  # the parent is part of it
    assert block_hash(None, (1, 2, 3, 5)) != a and block_hash(None, (2**40, 2)) != block_hash(None, (0, 2))
