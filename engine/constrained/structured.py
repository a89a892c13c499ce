"""Grammar-constrained decoding with llguidance: JSON schema, json_object, GBNF, Lark, regex.

Pieces and who uses them:
- builders (`json_object`, `json_schema`, `gbnf`, `lark`, `regex`, `response_format`; defined in
  engine/constrained/grammars.py, re-exported here) turn a request parameter into a `GrammarSpec`
  (llguidance's grammar text + the parameter's name for errors); they raise `GrammarError` (a
  ValueError with `.param`) for input that is not even well formed.
- `StructuredOutputs` (one per model) owns the llguidance tokenizer and a compile cache keyed by
  the grammar text. `compile`/`compile_async` validate (-> GrammarError, a 400 naming the
  parameter) and return a `CompiledGrammar`; the async form runs in a worker thread so that the
  engine thread never compiles.
- `CompiledGrammar.new_state()` gives the per-request `GrammarState` that goes into
  `SamplingParams.grammar`: the sampler calls `fill_mask(row)` before the draw, `accept(token)`
  after it, and the engine ends the request when `is_terminated()`. One state per request:
  n > 1 choices need n states.

The llguidance tokenizer is built from our tokenizer's exact token bytes (`Tokenizer.token_bytes`)
rather than from `tokenizer.hf.to_str()`: llguidance's tokenizer.json reader marks every added
token special, which would forbid e.g. qwen's single `<tool_call>` token wherever the grammar says
the text "<tool_call>"; with the bytes, grammar text and detokenized text agree token for token.
Building it takes seconds on a 150k vocabulary, so it starts in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Any

import llguidance as llg
import numpy as np
import torch

from .grammar_mask import apply_bitmask, fill_masks
from .grammars import (GrammarError, GrammarSpec, close_objects, gbnf, json_object, json_schema, lark,
                       regex, response_format)

__all__ = ["GrammarError", "GrammarSpec", "StructuredOutputs", "CompiledGrammar", "GrammarState",
           "json_object", "json_schema", "gbnf", "lark", "regex", "response_format", "fill_masks",
           "get_structured", "close_objects"]


# ---- per-model compile + per-request state ---------------------------------------------------
class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: token bytes, special ids, an encode function."""

    def __init__(self, tok: Any) -> None:
        n = tok.vocab_size
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.special_token_ids = [i for i in range(n) if tok.is_special(i)]
        self.tokens = [tok.token_bytes(i) for i in range(n)]
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special=False, parse_special=False)


class StructuredOutputs:
    """One per model: the llguidance tokenizer, a compile cache (by grammar text), and states."""

    def __init__(self, tokenizer: Any, *, cache_size: int = 256, background: bool = True) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self._ll: llg.LLTokenizer | None = None
        self._init_error: BaseException | None = None
        self._ready = threading.Event()
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        if background:
            threading.Thread(target=self._build, name="llguidance-tokenizer", daemon=True).start()
        else:
            self._build()

    def _build(self) -> None:
        try:
            eog = sorted(self.tokenizer.eog_ids) or [self.tokenizer.eos_id]
            wrapper = llg.TokenizerWrapper(_TokenizerView(self.tokenizer))
            self._ll = llg.LLTokenizer(wrapper, n_vocab=self.vocab_size, eos_token=eog)
        except BaseException as e:  # noqa: BLE001 - reported on first use
            self._init_error = e
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def ll_tokenizer(self) -> llg.LLTokenizer:
        self._ready.wait()
        if self._ll is None:
            raise RuntimeError(f"llguidance tokenizer failed to build: {self._init_error}")
        return self._ll

    def compile(self, spec: GrammarSpec, deadline: float | None = None) -> CompiledGrammar:
        """Validate and compile (cached by grammar text). Raises GrammarError(param=spec.param),
        also when time.monotonic() passes `deadline` or the grammar admits no output at all."""
        with self._lock:
            hit = self._cache.get(spec.grammar)
            if hit is not None:
                self._cache.move_to_end(spec.grammar)
                return hit
        ll = self.ll_tokenizer
        what = spec.kind.replace("_", " ")
        # validation and matcher construction both drop the GIL (they can take ~1-100 ms)
        err = llg.LLMatcher.validate_grammar(spec.grammar, ll)
        if err:
            raise GrammarError(f"invalid {what}: {err}", spec.param)
        _check_deadline(deadline, spec)
        matcher = llg.LLMatcher(ll, spec.grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {what}: {matcher.get_error()}", spec.param)
        _check_deadline(deadline, spec)
        compiled = CompiledGrammar(spec, matcher, self.vocab_size)
        # a grammar can be well formed yet admit nothing (`{"$ref": "#"}` refers only to itself):
        # find out now, as a 400, rather than at the first generated token
        probe = matcher.deep_copy()
        if not probe.is_accepting() and not _any_bit(compiled.new_state(probe).fill_bitmask_or_none()):
            why = (probe.get_error() or "no token can start it").split("\n", 1)[0]
            raise GrammarError(f"the {what} admits no output ({why})", spec.param)
        with self._lock:
            self._cache[spec.grammar] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        return await asyncio.to_thread(self.compile, spec)


def _check_deadline(deadline: float | None, spec: GrammarSpec) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise GrammarError(f"compiling the {spec.kind.replace('_', ' ')} took longer than its time budget", spec.param)


def _any_bit(mask: np.ndarray | None) -> bool:
    return mask is not None and bool(mask.any())


class CompiledGrammar:
    """A validated grammar: a pristine matcher that each request deep-copies (~10 us)."""

    def __init__(self, spec: GrammarSpec, matcher: llg.LLMatcher, vocab_size: int) -> None:
        self.spec = spec
        self._matcher = matcher
        self.vocab_size = vocab_size

    def new_state(self, matcher: llg.LLMatcher | None = None) -> GrammarState:
        return GrammarState(matcher or self._matcher.deep_copy(), self)


class GrammarState:
    """Per-request matcher; the sampler's seam (see engine/core/sampling.py)."""

    fill_masks = staticmethod(fill_masks)  # the sampler masks every GrammarState row of a batch at once

    def __init__(self, matcher: llg.LLMatcher, compiled: CompiledGrammar) -> None:
        self.matcher = matcher
        self.compiled = compiled
        words = (compiled.vocab_size + 31) // 32
        self.bitmask = np.full((1, words), -1, dtype=np.int32)  # bit i of word w: token 32*w+i

    def fill_bitmask(self) -> np.ndarray:
        """Compute the allowed-token bitmask for the next token into `self.bitmask` [1, words]."""
        m, bm = self.matcher, self.bitmask
        m.unsafe_compute_mask_ptr(bm.ctypes.data, bm.nbytes)
        if m.is_error():
            raise RuntimeError(f"grammar error: {m.get_error()}")
        return bm

    def fill_bitmask_or_none(self) -> np.ndarray | None:
        """The bitmask, or None when the matcher is in an error state."""
        try:
            return self.fill_bitmask()
        except RuntimeError:
            return None

    def fill_mask(self, logits_row: torch.Tensor) -> None:
        """Set disallowed logits to -inf in place (`logits_row` is 1-D, >= vocab entries)."""
        apply_bitmask(logits_row.unsqueeze(0), self.fill_bitmask())

    def accept(self, token_id: int) -> bool:
        if not self.matcher.consume_token(int(token_id)):
            raise RuntimeError(f"token {token_id} rejected by the grammar: {self.matcher.get_error()}")
        return True

    def is_terminated(self) -> bool:
        """True when nothing but end-of-generation can follow (or the matcher failed)."""
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (may be appended without sampling)."""
        return self.matcher.compute_ff_tokens()

    def new_state(self) -> GrammarState:
        """A fresh state for the same grammar (for another choice of an n > 1 request)."""
        return self.compiled.new_state()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


_by_tokenizer: dict[int, tuple[Any, StructuredOutputs]] = {}
_by_lock = threading.Lock()


def get_structured(tokenizer: Any) -> StructuredOutputs:
    """The StructuredOutputs for `tokenizer`, created (and its background build started) once."""
    with _by_lock:
        hit = _by_tokenizer.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            hit = _by_tokenizer[id(tokenizer)] = (tokenizer, StructuredOutputs(tokenizer))
        return hit[1]
