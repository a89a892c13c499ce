"""Token-budget continuous batching with chunked prefill and preemption by recompute.

Each step hands out at most `max_num_batched_tokens` tokens:
1. running sequences first, oldest first: decoding ones take 1 token each, then those still
   working through their prompt take a chunk of what is left of the budget;
2. then waiting sequences in arrival order, while fewer than `max_num_seqs` run, each taking its
   cached prefix for free and a chunk of the rest.
While any sequence decodes, prompt chunks together get at most `long_prefill_tokens` of a step,
so a long prompt cannot stretch the decoders' inter-token gap to a whole prefill. Without chunked
prefill (encoders: bidirectional attention needs all of an input at once) a sequence is admitted
only when its whole prompt fits what is left of the step.

Fairness is per client request (`Sequence.group`: the n choices of one request share a group).
When requests compete for slots, each group's fair share is max_num_seqs / groups; a waiting
sequence whose group holds its share is passed over (not blocking the queue), and when every slot
is taken while a group below its share waits, the newest sequence of the group furthest above its
share is preempted. Alone, a request may use every slot.

When the pool cannot give a running sequence its next block, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the waiting queue, to be recomputed
(its tokens so far included; full blocks come back from the prefix cache) when room returns.
Nothing is ever killed for lack of KV memory.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per seq
    preempted: list[Sequence] = field(default_factory=list)
    aborted: list[Sequence] = field(default_factory=list)  # removed this step, blocks freed

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_tokens: int | None = None, chunked_prefill: bool = True) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one token per running seq)")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_tokens = long_prefill_tokens or max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order: the last one is the newest
        self.requests: dict[str, Sequence] = {}
        self._to_abort: set[str] = set()
        self.num_preemptions = 0
        # keep a few blocks free for running decoders when admitting new prompts (less thrash)
        self.watermark_blocks = max(1, kv.num_blocks // 100)

    # ---- requests ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Marks a request; its blocks are freed at the start of the next schedule()."""
        if request_id in self.requests:
            self._to_abort.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._to_abort)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (stop, length, error, abort) and returns its blocks to the pool."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        self.requests.pop(seq.request_id, None)
        self._to_abort.discard(seq.request_id)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for rid in sorted(self._to_abort):
            seq = self.requests[rid]
            seq.aborted = True
            self.finish(seq, "abort")
            out.aborted.append(seq)
        budget = self.max_num_batched_tokens
        decoders = any(s.num_uncomputed == 1 for s in self.running)
        prefill = self.long_prefill_tokens if decoders else budget  # what prompt chunks may take
        # decoders (1 token) before sequences still in their prompt; both oldest first
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.arrival)):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            decoding = seq.num_uncomputed == 1
            n = 1 if decoding else min(seq.num_uncomputed, budget, prefill)
            if n == 0:
                continue
            while not self.kv.allocate(seq, n):
                victim = self.running[-1]
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
                prefill -= 0 if decoding else n
        if not out.preempted:
            self._preempt_for_fairness(out)
            self._admit(min(budget, prefill), out)
        return out

    # ---- fairness ----------------------------------------------------------------------------
    def _share(self) -> int:
        groups = {s.group for s in self.running} | {s.group for s in self.waiting}
        return max(1, self.max_num_seqs // max(1, len(groups)))

    def _preempt_for_fairness(self, out: SchedulerOutput) -> None:
        """Every slot taken while a group below its share waits: free one slot from the group
        furthest above its share (its newest sequence), once per step."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        share, held = self._share(), Counter(s.group for s in self.running)
        if not any(held[s.group] < share for s in self.waiting):
            return
        over = max(held, key=lambda g: held[g])
        if held[over] > share:
            self._preempt(next(s for s in reversed(self.running) if s.group == over), out)

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        share, held = self._share(), Counter(s.group for s in self.running)
        starving = {s.group for s in self.waiting if held[s.group] < share}
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if held[seq.group] >= share and starving:
                continue  # its request holds its share while another waits below its own
            hits = [] if seq.needs_all_hidden() else self.kv.get_computed_blocks(seq)
            num_cached = len(hits) * self.kv.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.chunked_prefill and n < seq.num_tokens - num_cached:
                break  # the next step grants it whole (arrival order kept)
            reserve = self.watermark_blocks if self.running else 0
            need = self.kv.blocks_needed(num_cached + n) - len(hits)
            if self.kv.num_free_blocks - need < reserve or not self.kv.allocate(seq, n, hits):
                break  # memory, not fairness: keep arrival order
            self.waiting.remove(seq)
            held[seq.group] += 1
            if held[seq.group] >= share:
                starving.discard(seq.group)
            if seq.metrics.first_scheduled_time is None:  # first admission, not a recompute
                seq.metrics.first_scheduled_time = time.monotonic()
                seq.metrics.cached_prompt_tokens = num_cached
                self.kv.record_hits(seq.num_prompt_tokens, num_cached)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Frees `seq`'s blocks and requeues it at the head; returns budget it had been granted."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        if seq in out.seqs:  # already granted tokens this step: take them back
            i = out.seqs.index(seq)
            out.seqs.pop(i)
            return out.num_new_tokens.pop(i)
        return 0

    def update(self, out: SchedulerOutput) -> None:
        """After the forward pass: the granted tokens are now in the cache; publish full blocks."""
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq)
