"""One request's state as the scheduler and runner see it.

There are no prefill/decode phases: a sequence has `num_tokens` (prompt + generated) and
`num_computed_tokens` (tokens whose K/V are in the cache). Each step the scheduler grants it some of
the difference; when the grant reaches `num_tokens` the step samples one new token. A decoding
sequence is simply one whose difference is 1. Preemption sets `num_computed_tokens` back to 0: the
prompt and the tokens generated so far are recomputed, then generation continues where it stopped.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .outputs import RequestMetrics, TokenLogprob
from .pooling import Pooler, PoolingParams
from .sampling import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens, or what the context leaves
    group: str = ""  # the client request it belongs to (n choices share one): fairness unit; "" = own id
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # kv_cache.BlockHash per full block
    status: SequenceStatus = SequenceStatus.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))  # FCFS order, survives preemption
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    # output bookkeeping (engine/core/engine.py)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    detokenizer: Any = None
    stop_checker: Any = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    aborted: bool = False
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # embedding requests (engine/core/pooling.py): prefill only, finished once the prompt is computed
    pooling: PoolingParams | None = None
    pooler: Pooler | None = None

    def __post_init__(self) -> None:
        self.group = self.group or self.request_id
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if not self.metrics.arrival_time:
            self.metrics.arrival_time = time.monotonic()
        self.metrics.prompt_tokens = len(self.prompt_token_ids)
        if self.pooling is not None and self.pooler is None:
            self.pooler = Pooler(self.pooling)

    @property
    def is_embedding(self) -> bool:
        """Prefill-only: its prompt's hidden states are pooled, nothing is sampled."""
        return self.pooling is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def needs_all_hidden(self) -> bool:
        """Every prompt token must run through the model (no prefix-cache shortcut)."""
        return self.is_embedding or self.wants_prompt_logprobs()

    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.metrics.generated_tokens = self.num_output_tokens
