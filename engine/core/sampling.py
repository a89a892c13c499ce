"""Sampling parameters and the batched sampler.

The sampler works on the logits of every sequence that samples this step, as one [B, V] tensor on
the model's device. Order of operations (each only on the rows that ask for it):
    logit_bias -> (logprobs snapshot) -> penalties -> bans (min_tokens, grammar) -> temperature
    -> top_k -> top_p -> min_p -> draw
Logprobs are read after logit_bias and before everything else (OpenAI semantics). Greedy rows
(temperature 0) take the argmax. The draw is argmax(p / e) with e ~ Exp(1) (equivalent to sampling
from p); a request with a seed draws e from its own torch.Generator, one row of V per token, so its
samples do not depend on what else is in the batch.

Structured output: `params.grammar` is any object with
    fill_mask(logits_row: Tensor[V]) -> None   # sets the logits of disallowed tokens to -inf in place
    accept(token_id: int) -> None              # advances the grammar past the sampled token
    is_terminated() -> bool                    # the grammar is complete: the request stops
The sampler calls fill_mask before the draw and accept after it; the engine checks is_terminated.
Forced tokens: `params.token_forcer` is any object with
    active -> bool                             # False: it has nothing left to do (plain sampling)
    next_forced() -> int | None                # a token id: every other token is masked this step
    accept(token_id: int) -> None              # sees every sampled token while active
(engine/text/reasoning.py's ThinkingBudget forces the end of the thinking this way); the forced
token is applied after the grammar mask, so the grammar must allow it.
A grammar class may also offer `fill_masks(logits, [(row, state), ...]) -> [error | None, ...]`
(a staticmethod): the sampler then masks all rows of that class in one call (one device copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .outputs import TokenLogprob

_GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy


@dataclass
class SamplingParams:
    """Per-request decoding controls. Defaults follow the OpenAI API (temperature 1, top_p 1)."""

    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp repeat_penalty (multiplicative, over all previous tokens)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob + top k alternatives
    prompt_logprobs: int | None = None  # same for prompt tokens (completions echo)
    n: int = 1
    skip_special_tokens: bool = True
    # structured output (engine/constrained/structured.py): a compiled-grammar handle, or None
    grammar: object | None = None
    # forced tokens (e.g. a reasoning budget's end tag): a TokenForcer, or None
    token_forcer: TokenForcer | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TokenForcer(Protocol):
    """Per-sequence forced tokens (see the module docstring)."""

    @property
    def active(self) -> bool: ...

    def next_forced(self) -> int | None: ...

    def accept(self, token_id: int) -> None: ...


class SamplingState(Protocol):
    """What the sampler reads from a sequence (engine/core/sequence.py)."""

    params: SamplingParams
    token_ids: list[int]
    prompt_token_ids: list[int]
    generator: torch.Generator | None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    errors: list[str | None]  # a grammar hook that raised: that request ends with "error"


def greedy_token_ids(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64: the greedy (temperature 0) pick, the first of tied maxima (torch.argmax).
    The sampler's draw and the decode graph (engine/core/graph_runner.py) both call this."""
    return logits.argmax(dim=-1)


def is_plain_greedy(s: SamplingState) -> bool:
    """The sampler would return greedy_token_ids of this row's raw logits and nothing else: greedy,
    no logprobs, logit_bias, penalties, grammar or active min_tokens ban. The decode graph's argmax
    then stands in for the sampler."""
    p = s.params
    return (p.temperature < _GREEDY_EPS and p.logprobs is None and not p.logit_bias and not _has_penalty(p)
            and p.grammar is None and not _min_tokens_pending(s)
            and (p.token_forcer is None or not p.token_forcer.active))


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logprobs [N, V] (log-softmaxed), token_ids [N] -> each token's logprob and the top k."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1).long()).squeeze(1).tolist()
    top_v, top_i = (logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long()))
    tv, ti = top_v.tolist(), top_i.tolist()
    return [
        TokenLogprob(int(t), float(c), list(zip(map(int, i), map(float, v))))
        for t, c, i, v in zip(token_ids.tolist(), chosen, ti, tv)
    ]


class Sampler:
    def __init__(self, vocab_size: int, eog_ids: set[int] | frozenset[int] = frozenset()) -> None:
        self.vocab_size = vocab_size
        self.eog_ids = sorted(eog_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[SamplingState]) -> SamplerOutput:
        logits = logits.float().clone()
        params = [s.params for s in seqs]
        errors: list[str | None] = [None] * len(seqs)
        self._apply_logit_bias(logits, params)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        lp = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None
        self._apply_penalties(logits, seqs)
        self._apply_bans(logits, seqs, errors)
        self._apply_forced(logits, seqs)
        tokens = self._draw(logits, seqs)
        for i, s in enumerate(seqs):
            if s.params.token_forcer is not None and s.params.token_forcer.active:
                s.params.token_forcer.accept(int(tokens[i]))
        for i, s in enumerate(seqs):
            if s.params.grammar is not None and errors[i] is None:
                try:
                    s.params.grammar.accept(int(tokens[i]))
                except Exception as e:  # noqa: BLE001 - one request's grammar must not stop the batch
                    errors[i] = f"grammar accept failed: {e}"
        out_lp: list[TokenLogprob | None] = [None] * len(seqs)
        if lp is not None:
            k = max(params[i].logprobs or 0 for i in lp_rows)
            for j, (i, tl) in enumerate(zip(lp_rows, token_logprobs(lp, tokens[lp_rows], k))):
                tl.top = tl.top[: params[i].logprobs or 0]
                out_lp[i] = tl
        return SamplerOutput([int(t) for t in tokens.tolist()], out_lp, errors)

    def _apply_logit_bias(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for tok, bias in p.logit_bias.items():
                rows.append(i), cols.append(int(tok)), vals.append(float(bias))
        if rows:
            idx = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(idx, torch.tensor(vals, device=logits.device), accumulate=True)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[SamplingState]) -> None:
        rows = [i for i, s in enumerate(seqs) if _has_penalty(s.params)]
        if not rows:
            return
        dev, V = logits.device, self.vocab_size
        sub = logits[rows]
        outs = [seqs[i].token_ids[len(seqs[i].prompt_token_ids) :] for i in rows]
        counts = _counts(outs, V, dev)
        prompts = [seqs[i].prompt_token_ids for i in rows]
        seen = (counts > 0) | (_counts(prompts, V, dev) > 0)
        ps = [seqs[i].params for i in rows]
        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        # llama.cpp / CTRL: divide positive logits, multiply negative ones, for every seen token
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[rows] = sub

    def _apply_bans(self, logits: torch.Tensor, seqs: list[SamplingState], errors: list[str | None]) -> None:
        batched: dict[Any, list[tuple[int, Any]]] = {}  # a grammar class's fill_masks -> its rows
        for i, s in enumerate(seqs):
            p = s.params
            if _min_tokens_pending(s):
                banned = list(self.eog_ids) + list(p.stop_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")
            if p.grammar is None:
                continue
            fill_many = getattr(type(p.grammar), "fill_masks", None)
            if fill_many is not None:
                batched.setdefault(fill_many, []).append((i, p.grammar))
                continue
            try:
                p.grammar.fill_mask(logits[i])
            except Exception as e:  # noqa: BLE001
                errors[i] = f"grammar mask failed: {e}"
        for fill_many, rows in batched.items():
            try:
                row_errors = fill_many(logits, rows)
            except Exception as e:  # noqa: BLE001
                row_errors = [str(e)] * len(rows)
            for (i, _), err in zip(rows, row_errors):
                if err is not None:
                    errors[i] = f"grammar mask failed: {err}"

    def _apply_forced(self, logits: torch.Tensor, seqs: list[SamplingState]) -> None:
        for i, s in enumerate(seqs):
            f = s.params.token_forcer
            tok = f.next_forced() if f is not None and f.active else None
            if tok is not None:
                keep = logits[i, tok].clone()
                logits[i] = float("-inf")
                logits[i, tok] = keep if torch.isfinite(keep) else 0.0

    def _draw(self, logits: torch.Tensor, seqs: list[SamplingState]) -> torch.Tensor:
        params = [s.params for s in seqs]
        tokens = greedy_token_ids(logits)
        rows = [i for i, p in enumerate(params) if p.temperature >= _GREEDY_EPS]
        if not rows:
            return tokens
        dev = logits.device
        ps = [params[i] for i in rows]
        x = logits[rows] / torch.tensor([p.temperature for p in ps], device=dev)[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in ps):
            x = _top_k_top_p(x, [p.top_k for p in ps], [p.top_p for p in ps])
        probs = torch.softmax(x, dim=-1)
        if any(p.min_p > 0 for p in ps):
            min_p = torch.tensor([p.min_p for p in ps], device=dev)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        q = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if seqs[i].generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_()
        for j, i in enumerate(rows):
            if seqs[i].generator is not None:
                q[j].exponential_(generator=seqs[i].generator)
        tokens[rows] = (probs / q).argmax(dim=-1)
        return tokens


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _min_tokens_pending(s: SamplingState) -> bool:
    p = s.params
    return bool(p.min_tokens) and len(s.token_ids) - len(s.prompt_token_ids) < p.min_tokens


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] occurrence counts; padding goes to a spare column dropped after."""
    width = max((len(t) for t in token_lists), default=0)
    idx = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.long)
    for r, t in enumerate(token_lists):
        idx[r, : len(t)] = torch.tensor(t, dtype=torch.long)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, idx.to(device), torch.ones(idx.shape, device=device))
    return counts[:, :vocab]


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top k and outside its top-p nucleus."""
    V = x.shape[1]
    srt, idx = x.sort(dim=-1, descending=True)
    ks = torch.tensor([k if 0 < k < V else V for k in top_k], device=x.device)
    keep = torch.arange(V, device=x.device)[None, :] < ks[:, None]
    srt = srt.masked_fill(~keep, float("-inf"))
    ps = torch.tensor(top_p, device=x.device)[:, None]
    probs = torch.softmax(srt, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better tokens: keep while it is below top_p
    srt = srt.masked_fill(before >= ps, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, idx, srt)


class StopChecker:
    """Finds stop strings in streamed text, across token boundaries.

    `add(text)` returns the text that may be released now and the stop string matched, if any.
    Text that could be the beginning of a stop string is held back until the next token decides;
    `flush()` releases it when the request ends for another reason."""

    def __init__(self, stop: list[str], include_stop: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.held = ""

    def add(self, text: str) -> tuple[str, str | None]:
        if not self.stop:
            return text, None
        buf = self.held + text
        hits = [(buf.find(s), -len(s), s) for s in self.stop if s in buf]
        if hits:
            pos, _, s = min(hits)  # earliest match; the longest one on a tie
            self.held = ""
            return buf[: pos + (len(s) if self.include_stop else 0)], s
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
