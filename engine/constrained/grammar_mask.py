"""Applying llguidance token bitmasks to logits (plain torch/numpy; no llguidance.torch).

Bitmask layout: int32 [B, ceil(V/32)], bit i of word w allows token 32*w + i (little-endian, so
the bytes read in order with `bitorder="little"` are the tokens in order). Logit columns past the
tokenizer's vocabulary (a padded LM head) are always disallowed.

`fill_masks` is the batched form for the sampler: it computes the masks of all constrained rows
(in parallel in llguidance's thread pool, GIL released, when there are enough cores), then
applies them at once: one host-to-device copy of the packed words on an accelerator. A row is
anything with the `MaskedRow` shape (engine/constrained/structured.py's GrammarState is the one
the sampler passes); this module knows bitmasks and matchers, not grammars.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    import llguidance as llg

_executor = None
_CPUS = os.cpu_count() or 1
_shifts: dict[torch.device, torch.Tensor] = {}


class MaskedRow(Protocol):
    """What `fill_masks` needs of one constrained row: its matcher, a [1, words] int32 bitmask
    buffer (its width gives the batch's), and the one-row path."""

    matcher: llg.LLMatcher
    bitmask: np.ndarray

    def fill_mask(self, logits_row: torch.Tensor) -> None: ...


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [B, W] words (any device) -> bool [B, 32*W] allowed-token matrix on that device."""
    shifts = _shifts.get(words.device)
    if shifts is None:
        shifts = _shifts[words.device] = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().view(words.shape[0], -1)


def apply_bitmask(logits: torch.Tensor, bits: np.ndarray) -> None:
    """logits [B, V] (a view is fine) gets -inf wherever `bits` [B, W] disallows the token."""
    vocab = logits.shape[-1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        # numpy on CPU: single-threaded, so no intra-op thread wake-ups (milliseconds on a busy
        # machine) for what is a ~20 us operation
        arr = logits.numpy()
        n = min(vocab, bits.shape[1] * 32)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, count=n, bitorder="little")
        np.copyto(arr[:, :n], -np.inf, where=allowed == 0)
        arr[:, n:] = -np.inf
        return
    # elsewhere (an accelerator, other dtypes): copy the packed words (V/8 bytes per row), unpack there
    allowed = _unpack(torch.from_numpy(bits).to(logits.device))
    n = min(vocab, allowed.shape[1])
    logits[:, :n].masked_fill_(~allowed[:, :n], float("-inf"))
    if vocab > n:
        logits[:, n:] = float("-inf")


def _get_executor():  # noqa: ANN202 - llguidance type
    global _executor
    if _executor is None:
        import llguidance as llg

        _executor = llg.LLExecutor()
    return _executor


def fill_masks(logits: torch.Tensor, rows: Sequence[tuple[int, MaskedRow]]) -> list[str | None]:
    """Constrain rows of `logits` [B, V] in place: rows = [(row index, grammar state), ...].
    Returns one error message (or None) per entry of `rows`: a failed matcher ends only its
    own request."""
    if not rows:
        return []
    if len(rows) == 1:
        i, st = rows[0]
        try:
            st.fill_mask(logits[i])
        except RuntimeError as e:
            return [str(e)]
        return [None]
    words = rows[0][1].bitmask.shape[1]
    bits = np.empty((len(rows), words), dtype=np.int32)
    if len(rows) >= 8 and _CPUS >= 8:
        _get_executor().unsafe_compute_mask_ptr([(st.matcher, j) for j, (_, st) in enumerate(rows)],
                                                bits.ctypes.data, words * 4, len(rows))
    else:  # a thread pool on a few busy cores costs more than the ~20-50 us per row it splits
        for j, (_, st) in enumerate(rows):
            st.matcher.unsafe_compute_mask_ptr(bits[j].ctypes.data, words * 4)
    errors = [f"grammar error: {st.matcher.get_error()}" if st.matcher.is_error() else None
              for _, st in rows]
    idx = [i for i, _ in rows]
    if idx == list(range(idx[0], idx[0] + len(idx))):  # contiguous rows: work on a view
        apply_bitmask(logits[idx[0]: idx[0] + len(idx)], bits)
    else:  # advanced indexing copies: mask the copy, write it back
        sub = logits[idx]
        apply_bitmask(sub, bits)
        logits[idx] = sub
    return errors
