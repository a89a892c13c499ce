"""Test helpers: drive a GrammarState with random allowed tokens (no model needed).

The walk samples uniformly among the tokens the grammar allows, then, after a while, prefers
tokens that close structures (quotes, brackets, short digits) and end-of-generation, so that
unbounded strings and numbers finish in a few hundred steps. Whatever it produces is, by
construction, something the sampler could have produced under the mask.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch

from engine.constrained.structured import GrammarState, StructuredOutputs
from engine.text.tokenizer import Tokenizer

_PAD = 7  # a padded LM head: the grammar must ban the columns past the vocabulary
_CLOSERS = {b'"', b"}", b"]", b'",', b'"}', b"}}", b'"]', b"1", b"0", b"\n", b">", b"</", b"tool",
            b"_", b"call", b"true", b" ", b","}


@functools.lru_cache(maxsize=4)
def load(path: str) -> tuple[Tokenizer, StructuredOutputs]:
    tok = Tokenizer.from_gguf(Path(path))
    return tok, StructuredOutputs(tok, background=False)


@functools.lru_cache(maxsize=4)
def _masks(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(closer, eog) boolean masks over the padded vocabulary."""
    closer = np.zeros(tok.vocab_size + _PAD, dtype=bool)
    closer[[i for i in range(tok.vocab_size) if tok.token_bytes(i) in _CLOSERS]] = True
    eog = np.zeros(tok.vocab_size + _PAD, dtype=bool)
    eog[sorted(tok.eog_ids)] = True
    return closer, eog


def walk(tok: Tokenizer, st: GrammarState, rng: random.Random, prefix: str = "",
         limit: int = 400, patience: int = 20) -> tuple[str, bool]:
    """Random tokens under the mask (after forcing `prefix`). Returns (text, ended): ended is
    True when the grammar stopped or end-of-generation was sampled."""
    out = tok.encode(prefix, add_special=False) if prefix else []
    for t in out:
        st.accept(t)
    closer, is_eog = _masks(tok)
    row = torch.zeros(tok.vocab_size + _PAD)
    arr = row.numpy()  # same memory; numpy keeps this single-threaded (fast on a busy machine)
    for step in range(limit):
        arr[:] = 0.0
        st.fill_mask(row)
        assert np.isinf(arr[tok.vocab_size:]).all()
        ok = np.isfinite(arr)
        allowed = ok.nonzero()[0]
        assert len(allowed), "the grammar allowed nothing"
        eog = (ok & is_eog).nonzero()[0]
        pref = (ok & closer).nonzero()[0]
        if step > patience and len(eog):
            t = int(eog[0])
        elif step > patience // 2 and len(pref) and rng.random() < 0.85:
            t = int(pref[rng.randrange(len(pref))])
        else:
            t = int(allowed[rng.randrange(len(allowed))])
        st.accept(t)
        if t in tok.eog_ids:
            return tok.decode(out), True
        out.append(t)
        if st.is_terminated():
            return tok.decode(out), True
    return tok.decode(out), False
