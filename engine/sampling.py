"""Sampling parameters and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # structured output (engine/structured.py): a compiled-grammar handle, or None
    grammar: object | None = None

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
