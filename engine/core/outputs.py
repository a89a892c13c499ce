"""What the engine hands back to its callers (the API, offline generate): one delta per step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of a sampled (or prompt) token and the top alternatives, from the
    distribution before sampling (OpenAI semantics: after logit_bias, before temperature/top-k)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestMetrics:
    arrival_time: float = 0.0  # time.monotonic()
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0


@dataclass
class RequestOutput:
    """One step's worth of news for one request.

    `text` and `token_ids` are the *new* text/tokens since the previous delta (text is released only
    at UTF-8 character boundaries and is held back while it could be the start of a stop string).
    `finished` is set on the last delta, with `finish_reason` "stop" | "length" | "abort" | "error"
    (and `error` holding the message for "error"). An embedding request has a single delta:
    finished, "stop", `embedding` set."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only, when asked
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # an embedding request's answer, on its one (finished) delta: one vector when pooled, one per
    # prompt token for pooling "none" (engine/core/pooling.py)
    embedding: list[list[float]] | None = None
