"""Embeddings: a sequence's last-layer hidden states (after the final norm) pooled into vectors.

An embedding request is prefill-only work: the scheduler grants its prompt in chunks like any
other, the runner hands each chunk's hidden rows to the sequence's `Pooler`, and when the last
chunk is in the engine finishes the sequence (its KV blocks freed at once) with the pooled vectors
as plain lists of floats. The cached-prefix shortcut is off for these sequences: every token's
hidden state is needed, not only its K/V.

Pooling as llama.cpp names it: `mean` (average over every prompt token), `cls` (the first token),
`last` (the last token), `none` (one vector per token). Normalisation is llama.cpp's
`embd_normalize`: -1 none, 0 max-abs scaled to int16 range, 1 taxicab, 2 euclidean (default),
p > 2 the p-norm; as in llama-server it applies to pooled vectors only, never to `none`'s rows.
`dimensions` keeps the first n components before normalising (OpenAI's shortened embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POOLING_TYPES = ("mean", "cls", "last", "none")


@dataclass(frozen=True)
class PoolingParams:
    """How one embedding request turns hidden states into its answer."""

    pooling: str = "mean"
    normalize: int = 2  # llama.cpp embd_normalize
    dimensions: int | None = None  # keep the first n components (None: all)

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, not {self.pooling!r}")
        if self.normalize < -1:
            raise ValueError("normalize must be >= -1")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError("dimensions must be >= 1")


def normalize(x: torch.Tensor, norm: int) -> torch.Tensor:
    """llama.cpp's common_embd_normalize over the last dimension (float32)."""
    x = x.float()
    if norm < 0:
        return x
    a = x.abs()
    if norm == 0:
        scale = a.amax(dim=-1, keepdim=True) / 32760.0
    elif norm == 2:
        scale = x.pow(2).sum(dim=-1, keepdim=True).sqrt()
    else:
        scale = a.pow(norm).sum(dim=-1, keepdim=True).pow(1.0 / norm)
    return torch.where(scale > 0, x / scale.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(x))


class Pooler:
    """Accumulates one sequence's hidden rows chunk by chunk (a chunk starting at position 0
    starts over: a preempted sequence is recomputed from its first token)."""

    def __init__(self, params: PoolingParams) -> None:
        self.params = params
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.acc: torch.Tensor | None = None  # mean: running sum; cls/last: the row; none: [n, H]
        self.rows: list[torch.Tensor] = []

    def add(self, hidden: torch.Tensor, pos0: int) -> None:
        """`hidden`: [count, H] rows of positions pos0 ... pos0 + count - 1."""
        if pos0 == 0:
            self.reset()
        if pos0 != self.count:
            raise RuntimeError(f"pooler got position {pos0}, expected {self.count}")
        h, kind = hidden.float(), self.params.pooling
        if kind == "mean":
            s = h.sum(dim=0)
            self.acc = s if self.acc is None else self.acc + s
        elif kind == "cls":
            if pos0 == 0:
                self.acc = h[0].clone()
        elif kind == "last":
            self.acc = h[-1].clone()
        else:
            self.rows.append(h.clone())
        self.count += h.shape[0]

    def result(self) -> list[list[float]]:
        """The request's vectors: one row when pooled, one per token for `none`."""
        p = self.params
        if p.pooling == "none":
            out = torch.cat(self.rows)
        else:
            assert self.acc is not None and self.count > 0
            out = (self.acc / self.count if p.pooling == "mean" else self.acc).unsqueeze(0)
        if p.dimensions is not None:
            out = out[:, : p.dimensions]
        if p.pooling != "none":
            out = normalize(out, p.normalize)
        return out.cpu().tolist()


def pool_hidden(hidden: torch.Tensor, params: PoolingParams) -> list[list[float]]:
    """One whole sequence's hidden states [T, H] -> its vectors (the same as chunked pooling)."""
    p = Pooler(params)
    p.add(hidden, 0)
    return p.result()
