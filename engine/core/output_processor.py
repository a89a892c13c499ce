"""Sampled token -> RequestOutput delta: detokenize, apply stop conditions, keep metrics.

Stop conditions, checked in order for each new token:
- an end-of-generation token (unless ignore_eos) or one of stop_token_ids: its text is not emitted;
- a stop string in the text (StopChecker: found across token boundaries; text that might begin a
  stop string is held back, so a stop string never leaks into the output);
- the grammar is complete (structured output);
- max_tokens, or the context is full ("length").
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from .outputs import RequestOutput, TokenLogprob
from .sampling import SamplingParams
from .sequence import Sequence


def default_detokenizer_factory(tokenizer: Any, params: SamplingParams) -> Any:
    from ..text.tokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, skip_special=params.skip_special_tokens)


class OutputProcessor:
    def __init__(self, tokenizer: Any, eog_ids: set[int], max_model_len: int,
                 detokenizer_factory: Callable[[Any, SamplingParams], Any] = default_detokenizer_factory) -> None:
        self.tokenizer, self.eog_ids, self.max_model_len = tokenizer, set(eog_ids), max_model_len
        self.detokenizer_factory = detokenizer_factory
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished = 0

    def new_detokenizer(self, params: SamplingParams) -> Any:
        return self.detokenizer_factory(self.tokenizer, params)

    def process(self, seq: Sequence, token: int, lp: TokenLogprob | None, err: str | None) -> RequestOutput:
        m, now = seq.metrics, time.monotonic()
        if m.first_token_time is None:
            m.first_token_time = now
            self.prompt_tokens_total += seq.num_prompt_tokens
        seq.append_token(token)
        self.generation_tokens_total += 1
        out = RequestOutput(seq.request_id, token_ids=[token], logprobs=[lp] if lp is not None else None)
        if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs, seq.prompt_logprobs_sent = list(seq.prompt_logprobs) or [None], True
        if err is not None:
            seq.error, reason = err, "error"
        else:
            reason, out.text = self._check(seq, token)
        if reason is not None:
            self._finish(seq, out, reason)
        out.metrics = dataclasses.replace(m)
        return out

    def final(self, seq: Sequence) -> RequestOutput:
        """The closing delta of a request ended without a new token (abort, error)."""
        out = RequestOutput(seq.request_id)
        self._finish(seq, out, seq.finish_reason or "abort")
        out.metrics = dataclasses.replace(seq.metrics)
        return out

    def _finish(self, seq: Sequence, out: RequestOutput, reason: str) -> None:
        seq.finish_reason = seq.finish_reason or reason
        out.finished, out.finish_reason = True, seq.finish_reason
        out.stop_reason, out.error = seq.stop_reason, seq.error
        seq.metrics.finished_time = time.monotonic()
        self.requests_finished += 1

    def _check(self, seq: Sequence, token: int) -> tuple[str | None, str]:
        p = seq.params
        if token in p.stop_token_ids or (token in self.eog_ids and not p.ignore_eos):
            seq.stop_reason = token if token in p.stop_token_ids else None
            return "stop", self._flush(seq)
        text, matched = seq.stop_checker.add(seq.detokenizer.add(token))
        if matched is not None:
            seq.stop_reason = matched
            return "stop", text
        if p.grammar is not None and p.grammar.is_terminated():
            return "stop", text + self._flush(seq)
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", text + self._flush(seq)
        return None, text

    def _flush(self, seq: Sequence) -> str:
        """Releases held-back text at the end; the detokenizer's last bytes may still hit a stop."""
        text, matched = seq.stop_checker.add(seq.detokenizer.flush())
        if matched is not None:
            seq.stop_reason = matched
            return text
        return text + seq.stop_checker.flush()
