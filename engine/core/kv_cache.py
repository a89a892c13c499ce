"""Paged KV-cache block pool with a prefix cache shared by every request.

The KV tensors themselves live in the runner ([num_blocks, block_size, n_kv_heads, head_dim] per
layer); this module only decides which block ids each sequence owns.

- Every block has a reference count. A block is owned by every running sequence whose block table
  lists it; two sequences that share a prompt prefix share the prefix's blocks (ref count 2).
- A block whose `block_size` tokens are all computed is *full* and gets a hash chained over its
  parent's hash and its token ids, so equal hashes mean equal whole prefixes. Full blocks are
  entered in `cached` (hash -> block), shared by all requests. The hash is a 128-bit BLAKE2b
  digest: with Python's 64-bit `hash()` a client could craft a prompt whose blocks collide with
  another user's cached prefix and read its KV (vLLM's CVE-2025-25183 was this pattern).
- A freed block (ref count 0) keeps its hash and stays in `cached`: a later request with the same
  prefix takes it back without recomputing. Free blocks sit in an LRU queue; allocation takes the
  least recently freed block and only then drops its hash (eviction).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

NO_HASH = None
BlockHash = bytes


class SequenceBlocks(Protocol):
    """What the pool needs from a sequence (engine/core/sequence.py implements it)."""

    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[BlockHash]  # hashes of the sequence's full blocks, in order (filled lazily)
    num_computed_tokens: int


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = NO_HASH
    token_ids: tuple[int, ...] = ()  # kept with the hash to rule out hash collisions on a hit


def block_hash(parent: BlockHash | None, token_ids: tuple[int, ...]) -> BlockHash:
    """Chained hash of a full block: equal hashes imply equal whole prefixes (parent included)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def num_blocks_for_budget(budget_bytes: int, block_size: int, kv_bytes_per_token: int) -> int:
    """How many blocks a memory budget holds (K and V of every layer for block_size tokens each)."""
    return max(0, budget_bytes // (block_size * kv_bytes_per_token))


class KVCacheManager:
    """Block ids for sequences: allocation, sharing through the prefix cache, freeing, eviction."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref-count-0 blocks, least recently freed first; values unused
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}  # block hash -> block id
        self.hit_tokens = 0  # prompt tokens served from the cache, all time
        self.queried_tokens = 0

    # ---- capacity ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------
    def _hashes(self, seq: SequenceBlocks, num_full: int) -> list[BlockHash]:
        """Extend seq.block_hashes to cover its first `num_full` full blocks and return them."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return hashes[:num_full]

    def _lookup(self, h: BlockHash, token_ids: tuple[int, ...]) -> int | None:
        bid = self.cached.get(h)
        if bid is None or self.blocks[bid].token_ids != token_ids:
            return None
        return bid

    def get_computed_blocks(self, seq: SequenceBlocks) -> list[int]:
        """Cached blocks holding a prefix of `seq` (not yet owned; `allocate` takes them).

        At most num_tokens - 1 tokens hit, so the last token is always computed and yields logits."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hashes = self._hashes(seq, (len(seq.token_ids) - 1) // bs)
        hits: list[int] = []
        for i, h in enumerate(hashes):
            bid = self._lookup(h, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            if bid is None:
                break
            hits.append(bid)
        return hits

    # ---- allocation ---------------------------------------------------------------------------
    def can_allocate(self, seq: SequenceBlocks, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        total = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(seq.block_table) - len(computed_blocks)
        # cached hits with ref count 0 sit in the free queue: taking them uses up free blocks too
        reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return max(need, 0) + reclaimed <= self.num_free_blocks

    def allocate(self, seq: SequenceBlocks, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens, first taking `computed_blocks`
        (prefix hits from get_computed_blocks; the caller then advances num_computed_tokens).
        Returns False, changing nothing, when the pool is short."""
        if not self.can_allocate(seq, num_new_tokens, computed_blocks):
            return False
        for bid in computed_blocks:
            self._take(bid)
            seq.block_table.append(bid)
        total = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(total):
            seq.block_table.append(self._pop_free())
        return True

    def _take(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count == 0:
            del self.free_queue[bid]
        b.ref_count += 1

    def _pop_free(self) -> int:
        bid, _ = self.free_queue.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not NO_HASH:  # evict: the least recently used cached block
            if self.cached.get(b.hash) == bid:
                del self.cached[b.hash]
            b.hash, b.token_ids = NO_HASH, ()
        b.ref_count = 1
        return bid

    def cache_full_blocks(self, seq: SequenceBlocks) -> None:
        """Publish the blocks of `seq` that became full of computed tokens into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        hashes = self._hashes(seq, num_full)
        for i in range(num_full):
            b = self.blocks[seq.block_table[i]]
            if b.hash is not NO_HASH:
                continue
            # another sequence may have published the same content first: keep theirs
            if hashes[i] not in self.cached:
                b.hash, b.token_ids = hashes[i], tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.cached[hashes[i]] = b.block_id

    def free(self, seq: SequenceBlocks) -> None:
        """Drop `seq`'s references. Tail blocks are freed first so they are evicted before the
        shared prefix blocks; blocks without a hash go to the front (nothing to reuse in them)."""
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref_count -= 1
            assert b.ref_count >= 0, f"block {bid} freed twice"
            if b.ref_count == 0:
                self.free_queue[bid] = None
                if b.hash is NO_HASH:
                    self.free_queue.move_to_end(bid, last=False)
        seq.block_table.clear()

    def record_hits(self, num_queried: int, num_hit: int) -> None:
        self.queried_tokens += num_queried
        self.hit_tokens += num_hit

    def reset_prefix_cache(self) -> None:
        for b in self.blocks:
            if b.ref_count == 0:
                b.hash, b.token_ids = NO_HASH, ()
        self.cached = {h: bid for h, bid in self.cached.items() if self.blocks[bid].hash == h}
