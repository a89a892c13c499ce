"""Runs one scheduled step on the model: flat batch in, sampled tokens out.

The runner owns the KV tensors (one (k, v) pair per layer, [num_blocks, block_size, n_kv, head_dim]).
For each step it packs the granted tokens of every sequence into one flat batch (ids, positions,
KV slots, block tables, cached lengths, cu_seqlens: see kernels/metadata.py), runs the model once,
computes logits only for the rows that sample (the last token of a sequence whose grant reaches
its end), and hands them to the sampler. An embedding sequence never samples: its rows go to its
pooler (engine/core/pooling.py), and the step that computes its last prompt token returns its vectors.
Decode-only steps on CUDA replay captured graphs that also run lm_head and the greedy argmax
(engine/core/graph_runner.py): a step whose sequences are all plain greedy then costs one packed
copy in and one copy of the sampled ids back.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from .graph_runner import CudaGraphRunner, DecodeOutputs, capture_decode_graphs, graph_mode
from .outputs import TokenLogprob
from .sampling import Sampler, SamplerOutput, is_plain_greedy, token_logprobs
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .step_metadata import StepMetadata

log = logging.getLogger("llamatron.runner")


@dataclass
class FlatBatch:
    step: StepMetadata
    sample_rows: list[int]  # flat row of the last token of each sampling sequence
    sample_seqs: list[Sequence]
    prompt_rows: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # seq idx -> (row0, pos0, count)
    pool_rows: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # embedding seqs, same layout


@dataclass
class RunnerOutput:
    seqs: list[Sequence]  # the sequences that sampled, in order
    sampled: SamplerOutput
    pooled: list[tuple[Sequence, list[list[float]]]] = field(default_factory=list)  # embeddings done this step


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int,
                 sampler: Sampler, cuda_graphs: bool | str = True) -> None:
        """`cuda_graphs`: "auto"/True (capture; run eagerly, with a warning, if that fails), "require"
        (a capture failure raises GraphCaptureError: benchmarks and GPU checks), "off"/False."""
        self.model = model
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = model.ops.device
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.sampler = sampler
        self.interrupt = threading.Event()  # set from another thread: the eager pass stops at its next layer
        self.graphs: CudaGraphRunner | None = capture_decode_graphs(
            graph_mode(cuda_graphs), self.device,
            lambda: CudaGraphRunner(model, self.kv_caches, max_num_seqs, self.max_blocks_per_seq, block_size,
                                    max_model_len))

    def prepare(self, sched: SchedulerOutput) -> FlatBatch:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seq_lens, cu = [], [0]
        sample_rows, sample_seqs, prompt_rows, pool_rows = [], [], {}, {}
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            cu.append(cu[-1] + n)
            if seq.is_embedding:
                pool_rows[i] = (cu[-2], start, n)
            elif end == seq.num_tokens:
                sample_rows.append(cu[-1] - 1)
                sample_seqs.append(seq)
            if seq.wants_prompt_logprobs():
                # prompt position p predicts token p + 1; skip positions done before a preemption
                first = max(start, len(seq.prompt_logprobs) - 1 if seq.prompt_logprobs else 0)
                last = min(end, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_rows[i] = (cu[-2] + first - start, first, last - first)
        step = StepMetadata(ids, pos, slots, [s.block_table for s in sched.seqs], seq_lens, cu)
        return FlatBatch(step, sample_rows, sample_seqs, prompt_rows, pool_rows)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        batch = self.prepare(sched)
        rows, seqs = batch.sample_rows, batch.sample_seqs
        if (self.graphs is not None and sched.is_decode_only and not batch.pool_rows
                and self.graphs.can_run(len(sched.seqs))):
            out: DecodeOutputs = self.graphs.run(batch.step)
            self._all_prompt_logprobs(sched, batch, out.hidden)
            if all(is_plain_greedy(s) for s in seqs):  # the graph's argmax is the sampler's answer
                ids = self.graphs.sampled_ids(out, rows)
                return RunnerOutput(seqs, SamplerOutput(ids, [None] * len(ids), [None] * len(ids)))
            logits = _take_rows(out.logits, rows)
        else:
            hidden = self.model.forward(*batch.step.to_device(self.device, self.block_size), self.kv_caches,
                                        self.interrupt)
            self._all_prompt_logprobs(sched, batch, hidden)
            pooled = self._pool(sched, batch, hidden)
            if not seqs:
                return RunnerOutput([], SamplerOutput([], [], []), pooled)
            logits = self.model.compute_logits(_take_rows(hidden, rows))
            return RunnerOutput(seqs, self.sampler(logits, seqs), pooled)
        return RunnerOutput(seqs, self.sampler(logits, seqs))

    def _pool(self, sched: SchedulerOutput, batch: FlatBatch, hidden: torch.Tensor) -> list[tuple[Sequence, list]]:
        """Feeds each embedding sequence's rows to its pooler; returns (seq, vectors) for those whose
        prompt is now fully computed."""
        done = []
        for i, (row0, pos0, count) in batch.pool_rows.items():
            seq = sched.seqs[i]
            seq.pooler.add(hidden[row0 : row0 + count], pos0)
            if pos0 + count == seq.num_tokens:
                done.append((seq, seq.pooler.result()))
        return done

    def _all_prompt_logprobs(self, sched: SchedulerOutput, batch: FlatBatch, hidden: torch.Tensor) -> None:
        for i, (row0, pos0, count) in batch.prompt_rows.items():
            self._prompt_logprobs(sched.seqs[i], hidden[row0 : row0 + count], pos0)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, pos0: int) -> None:
        """Logprobs of prompt tokens pos0+1 ... from the logits at positions pos0 ...; the first
        prompt token has none (None), as in the OpenAI echo format."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)
        nxt = torch.tensor(seq.prompt_token_ids[pos0 + 1 : pos0 + 1 + hidden.shape[0]], device=hidden.device)
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        entries: list[TokenLogprob] = token_logprobs(logprobs, nxt, seq.params.prompt_logprobs or 0)
        seq.prompt_logprobs.extend(entries)


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows]: a slice when the rows are 0..n-1 (every decode step), else one index copy."""
    if rows == list(range(len(rows))):
        return x[: len(rows)]
    return x.index_select(0, torch.tensor(rows, device=x.device))
