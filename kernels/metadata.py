"""The flat-batch description every attention op reads (built by engine/core/runner.py).

A step packs the new tokens of B sequences into one flat batch of T tokens:
- `slot_mapping` [T] int64: KV-cache slot (block * block_size + offset) of each new token, -1 = padding;
- `block_tables` [B, max_blocks] int32: the KV blocks of each sequence, in order (-1/0 past the end);
- `seq_lens` [B] int32: tokens in the cache for each sequence *after* this step (cached + new);
- `cu_seqlens_q` [B+1] int32: prefix sums of new-token counts: sequence b owns flat rows
  cu_seqlens_q[b] : cu_seqlens_q[b+1], which sit at positions seq_lens[b] - q_len ... seq_lens[b]-1.
A padded sequence has q_len 0 and seq_len 0 and is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_size: int = 16

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
