"""Runs one scheduled step on the model: flat batch in, sampled tokens out.

The runner owns the KV tensors (one (k, v) pair per layer, [num_blocks, block_size, n_kv, head_dim]).
For each step it packs the granted tokens of every sequence into one flat batch (ids, positions,
KV slots, block tables, cached lengths, cu_seqlens: see kernels/metadata.py), runs the model once,
computes logits only for the rows that sample (the last token of a sequence whose grant reaches
its end), and hands them to the sampler. Decode-only steps on CUDA replay captured graphs
(CudaGraphRunner below); CPU never touches that path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from kernels import AttentionMetadata

from .outputs import TokenLogprob
from .sampling import Sampler, SamplerOutput, token_logprobs
from .scheduler import SchedulerOutput
from .sequence import Sequence

log = logging.getLogger("llamatron.runner")


@dataclass
class FlatBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # flat row of the last token of each sampling sequence
    sample_seqs: list[Sequence]
    prompt_rows: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # seq idx -> (row0, pos0, count)


@dataclass
class RunnerOutput:
    seqs: list[Sequence]  # the sequences that sampled, in order
    sampled: SamplerOutput


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int,
                 sampler: Sampler, cuda_graphs: bool = True) -> None:
        self.model = model
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = model.ops.device
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.sampler = sampler
        self.interrupt = threading.Event()  # set from another thread: the eager pass stops at its next layer
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            try:
                self.graphs = CudaGraphRunner(model, self.kv_caches, max_num_seqs, self.max_blocks_per_seq,
                                              block_size, max_model_len)
            except Exception as e:  # noqa: BLE001 - graphs are an optimization; eager always works
                log.warning("CUDA graph capture failed, running eagerly: %s", e)

    def prepare(self, sched: SchedulerOutput) -> FlatBatch:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seq_lens, cu = [], [0]
        sample_rows, sample_seqs, prompt_rows = [], [], {}
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            cu.append(cu[-1] + n)
            if end == seq.num_tokens:
                sample_rows.append(cu[-1] - 1)
                sample_seqs.append(seq)
            if seq.wants_prompt_logprobs():
                # prompt position p predicts token p + 1; skip positions done before a preemption
                first = max(start, len(seq.prompt_logprobs) - 1 if seq.prompt_logprobs else 0)
                last = min(end, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_rows[i] = (cu[-2] + first - start, first, last - first)
        width = max(len(s.block_table) for s in sched.seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in sched.seqs],
                              dtype=torch.int32)  # one tensor per step, not one per sequence
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen_q=max(sched.num_new_tokens),
            max_seqlen_k=max(seq_lens),
            block_size=bs,
        )
        return FlatBatch(torch.tensor(ids, dtype=torch.long, device=dev),
                         torch.tensor(pos, dtype=torch.long, device=dev), meta,
                         sample_rows, sample_seqs, prompt_rows)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        batch = self.prepare(sched)
        if self.graphs is not None and sched.is_decode_only and self.graphs.can_run(len(sched.seqs)):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        else:
            hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv_caches, self.interrupt)
        for i, (row0, pos0, count) in batch.prompt_rows.items():
            self._prompt_logprobs(sched.seqs[i], hidden[row0 : row0 + count], pos0)
        if not batch.sample_seqs:
            return RunnerOutput([], SamplerOutput([], [], []))
        rows = torch.tensor(batch.sample_rows, device=hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return RunnerOutput(batch.sample_seqs, self.sampler(logits, batch.sample_seqs))

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, pos0: int) -> None:
        """Logprobs of prompt tokens pos0+1 ... from the logits at positions pos0 ...; the first
        prompt token has none (None), as in the OpenAI echo format."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)
        nxt = torch.tensor(seq.prompt_token_ids[pos0 + 1 : pos0 + 1 + hidden.shape[0]], device=hidden.device)
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        entries: list[TokenLogprob] = token_logprobs(logprobs, nxt, seq.params.prompt_logprobs or 0)
        seq.prompt_logprobs.extend(entries)


class CudaGraphRunner:
    """Decode-only steps (one token per sequence) replayed from CUDA graphs.

    One graph per bucketed batch size, captured at start-up over static input buffers. A batch of B
    sequences runs the smallest bucket >= B; rows B.. are padding: slot -1 (no KV write), seq_len 0
    and q_len 0 (cu_seqlens stays at B), so the attention kernel skips them and their hidden rows
    are never read. Requires graph-safe ops (the Triton backend: no host syncs, no allocation
    that depends on data); max_seqlen_k is fixed at max_model_len for the capture.
    """

    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks: int, block_size: int,
                 max_model_len: int) -> None:
        self.model, self.kv_caches = model, kv_caches
        dev = model.ops.device
        self.buckets = sorted({b for b in (1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)) if b <= max_num_seqs}
                              | {max_num_seqs})
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.cu = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        self.max_model_len, self.block_size = max_model_len, block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            self.model.forward(self.input_ids[:b], self.positions[:b], self._meta(b), kv_caches)  # warm-up
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self.model.forward(self.input_ids[:b], self.positions[:b], self._meta(b), kv_caches)
            pool = g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:b], self.tables[:b], self.seq_lens[:b], self.cu[: b + 1],
                                 max_seqlen_q=1, max_seqlen_k=self.max_model_len, block_size=self.block_size)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        B = input_ids.shape[0]
        b = next(x for x in self.buckets if x >= B)
        w = meta.block_tables.shape[1]
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slots.fill_(-1)
        self.slots[:B].copy_(meta.slot_mapping)
        self.tables.zero_()
        self.tables[:B, :w].copy_(meta.block_tables)
        self.seq_lens.zero_()
        self.seq_lens[:B].copy_(meta.seq_lens)
        self.cu.fill_(B)
        self.cu[: B + 1].copy_(meta.cu_seqlens_q)
        g, out = self.graphs[b]
        g.replay()
        return out[:B]
