"""Teacher-forced comparison of our next-token distribution with llama.cpp's (tests/data/*/greedy.json).

For each record: tokenize llama.cpp's prompt, append its 32 greedy tokens, run ONE forward pass
over the whole sequence, and compare log-softmax at every generated position with llama.cpp's
top-5 (`steps[].top5`). Steps are aligned by token id (llama.cpp reports one entry for a group of
tokens forming one character, carrying the last token's id).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.loading.gguf import GGUFFile
from engine.model import Model
from engine.text.tokenizer import Tokenizer
from kernels import AttentionMetadata, backend


@dataclass
class GreedyFigures:
    positions: int = 0
    top1_agree: int = 0
    abs_dp: list[float] = field(default_factory=list)
    confident_disagreements: int = 0  # llama.cpp's top-2 margin >= 0.05 and we pick another token
    prompt_len_mismatches: int = 0

    @property
    def top1(self) -> float:
        return self.top1_agree / max(self.positions, 1)

    @property
    def mean_dp(self) -> float:
        return sum(self.abs_dp) / max(len(self.abs_dp), 1)

    @property
    def p99_dp(self) -> float:
        s = sorted(self.abs_dp)
        return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)] if s else 0.0

    def summary(self) -> str:
        return (f"positions={self.positions} top1={self.top1:.4f} mean|dp|={self.mean_dp:.4f} "
                f"p99|dp|={self.p99_dp:.4f} confident_disagreements={self.confident_disagreements} "
                f"prompt_len_mismatches={self.prompt_len_mismatches}")


def load(path: Path, cpu_weights: str = "auto", max_positions: int = 2048) -> tuple[Model, Tokenizer]:
    g = GGUFFile(path)
    cfg = ModelConfig.from_gguf(g.metadata, set(g.tensors))
    ops = backend("cpu", cpu_weights)
    return Model.from_gguf(g, cfg, ops, max_positions), Tokenizer.from_gguf_metadata(g.metadata)


@torch.inference_mode()
def logprobs_for(model: Model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of the logits at every position (one sequence, one forward)."""
    n, bs = len(ids), 16
    nblocks = (n + bs - 1) // bs
    kv = model.allocate_kv_cache(nblocks, bs)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(nblocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        max_seqlen_q=n, max_seqlen_k=n, block_size=bs)
    hidden = model.forward(torch.tensor(ids), torch.arange(n), meta, kv)
    return torch.log_softmax(model.compute_logits(hidden), dim=-1)


def evaluate(model: Model, tok: Tokenizer, fixture: Path) -> GreedyFigures:
    data = json.loads(fixture.read_text())
    fig = GreedyFigures()
    for rec in data["records"]:
        prompt_ids = tok.encode(rec["request"]["prompt"], add_special=True, parse_special=True)
        if len(prompt_ids) != rec["tokens_evaluated"]:
            fig.prompt_len_mismatches += 1
        gen = rec["tokens"]
        lp = logprobs_for(model, prompt_ids + gen)
        j = 0
        for step in rec["steps"]:
            while j < len(gen) and gen[j] != step["id"]:
                j += 1
            if j == len(gen):
                break
            row = lp[len(prompt_ids) + j - 1]
            top5 = step["top5"]
            fig.positions += 1
            ours = int(row.argmax())
            fig.top1_agree += ours == top5[0]["id"]
            for e in top5:
                fig.abs_dp.append(abs(math.exp(row[e["id"]].item()) - math.exp(e["logprob"])))
            margin = math.exp(top5[0]["logprob"]) - (math.exp(top5[1]["logprob"]) if len(top5) > 1 else 0.0)
            if ours != top5[0]["id"] and margin >= 0.05:
                fig.confident_disagreements += 1
            j += 1
    return fig
