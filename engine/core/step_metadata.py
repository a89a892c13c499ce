"""StepMetadata: one step's flat batch on the host (token ids, positions, KV slots, block tables).

The runner builds it (engine/core/runner.py) and the eager forward and the CUDA-graph decode
(engine/core/graph_runner.py) both consume it; it lives apart so that neither imports the other's
module for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AttentionMetadata


@dataclass
class StepMetadata:
    """One step's flat batch on the host, as lists (see kernels/metadata.py for the meaning)."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T]
    block_tables: list[list[int]]  # [B] ragged: padded with block 0 when copied
    seq_lens: list[int]  # [B]
    cu_seqlens_q: list[int]  # [B + 1]

    def to_device(self, device: torch.device, block_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                      AttentionMetadata]:
        """(input_ids, positions, meta) for an eager forward."""
        width = max(len(t) for t in self.block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in self.block_tables], dtype=torch.int32)
        cu = self.cu_seqlens_q
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(self.slot_mapping, dtype=torch.int64, device=device),
            block_tables=tables.to(device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            max_seqlen_q=max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True)),
            max_seqlen_k=max(self.seq_lens),
            block_size=block_size,
        )
        return (torch.tensor(self.input_ids, dtype=torch.long, device=device),
                torch.tensor(self.positions, dtype=torch.long, device=device), meta)
