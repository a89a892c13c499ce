"""LLMEngine: the synchronous step loop (schedule -> run -> sample -> outputs) and offline generate.

AsyncEngine (engine/core/async_engine.py, which builds on this module) runs an LLMEngine on a background
thread for the API. One step:
    sched = scheduler.schedule()        # who computes how many tokens; aborts/preemptions applied
    result = runner.execute(sched)      # one forward pass, sampled tokens for finishing sequences
    scheduler.update(sched)             # tokens are in the cache; full blocks join the prefix cache
    outputs = [process(seq, token) ...] # detokenize, stop checks, finish -> RequestOutput deltas
Embedding requests (add_embedding_request) ride the same steps as prefill-only sequences: the step
that computes a prompt's last token finishes it with its pooled vectors and frees its blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import EngineConfig
from ..model import StepInterrupted
from .kv_cache import KVCacheManager, num_blocks_for_budget
from .outputs import RequestMetrics, RequestOutput, TokenLogprob
from .output_processor import OutputProcessor
from .pooling import PoolingParams
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, StopChecker
from .scheduler import Scheduler
from .sequence import Sequence

if TYPE_CHECKING:
    from ..loading.loader import LoadedModel

log = logging.getLogger("llamatron.engine")
# prompt tokens per step while others decode: about 0.3 s of a CPU step, ~50 ms of a GPU one
LONG_PREFILL_DEFAULT = {"cpu": 256, "cuda": 1024}


class ContextLengthError(ValueError):
    """prompt + max_tokens exceeds the context; raised before any work is done."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the length of the prompt or the completion."
        )


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (or the model is still loading): try again later."""


class EngineDeadError(RuntimeError):
    """The engine thread is gone (load failure, shutdown, or a crash)."""


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    total_blocks: int = 0
    free_blocks: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions: int = 0
    requests_finished: int = 0
    embedding_requests_finished: int = 0  # included in requests_finished


def validate_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> int:
    """Checks a request before any work; returns its resolved max_tokens."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if any(not 0 <= int(t) < vocab_size for t in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - n
    if n + max(max_tokens, 1) > max_model_len:
        raise ContextLengthError(n, max(max_tokens, 1), max_model_len)
    return max_tokens


def check_generates(model_config) -> None:
    """Encoders (BERT embedding models) embed only: a generation request is a client mistake (400)."""
    if model_config is not None and model_config.encoder:
        raise ValueError(f"this model ({model_config.name}, a {model_config.arch} encoder) serves embeddings only "
                         f"(/v1/embeddings); it cannot generate text")


def validate_embedding(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Checks an embedding request before any work: the whole input must fit the context."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the input is empty")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ValueError(f"input token ids must be in [0, {vocab_size})")
    if n > max_model_len:
        raise ContextLengthError(n, 0, max_model_len)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, num_blocks: int | None = None) -> None:
        if loaded is None:
            from ..loading.loader import load_model

            loaded = load_model(config)
        self.config, self.loaded = config, loaded
        self.tokenizer, self.chat_template = loaded.tokenizer, loaded.chat_template
        self.model_config = mcfg = loaded.config
        if config.max_model_len <= 0:
            from ..loading.loader import resolve_max_len

            config.max_model_len = resolve_max_len(config, mcfg, loaded.ops.device.type)
        bs = config.block_size
        if mcfg.encoder:  # inputs are granted whole (bidirectional attention): one must fit a step
            config.max_model_len = min(config.max_model_len, mcfg.context_length)  # learned positions end there
            config.max_num_batched_tokens = max(config.max_num_batched_tokens, config.max_model_len)
            config.enable_prefix_caching = False  # no KV cache to share
            config.cuda_graphs = False  # no decode steps
        num_blocks = num_blocks or self._blocks_from_budget()
        if num_blocks * bs < config.max_model_len:
            log.warning("KV pool holds %d tokens < context %d: context reduced", num_blocks * bs, config.max_model_len)
            config.max_model_len = num_blocks * bs
        self.kv_capacity_tokens = num_blocks * bs
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        long_prefill = config.long_prefill_tokens or LONG_PREFILL_DEFAULT.get(loaded.ops.device.type, 256)
        budget = max(config.max_num_batched_tokens, config.max_num_seqs)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, budget, long_prefill,
                                   chunked_prefill=not mcfg.encoder)
        eog = set(getattr(self.tokenizer, "eog_ids", ()) or ())
        self.runner = ModelRunner(loaded.model, num_blocks, bs, config.max_model_len, config.max_num_seqs,
                                  Sampler(mcfg.vocab_size, eog), config.cuda_graphs)
        self.outputs = OutputProcessor(self.tokenizer, eog, config.max_model_len)
        self.num_computed_tokens_total = 0  # tokens through the model, prefix hits excluded
        self.embeddings_finished = 0
        log.info("KV cache: %d blocks x %d = %d tokens (%s)", num_blocks, bs, self.kv_capacity_tokens, loaded.ops.device)

    def _blocks_from_budget(self) -> int:
        cfg, dev = self.config, self.loaded.ops.device
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget = int(free * cfg.gpu_memory_fraction)
        else:
            budget = int(cfg.kv_cache_gib * 2**30)
        per_token = self.model_config.kv_bytes_per_token(self.loaded.ops.kv_dtype.itemsize)
        # more than every slot at full context is never used
        cap = -(-cfg.max_model_len * cfg.max_num_seqs // cfg.block_size)
        if per_token == 0:  # an encoder: blocks are only the scheduler's bookkeeping
            return cap
        n = min(num_blocks_for_budget(budget, cfg.block_size, per_token), cap)
        if n < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no {cfg.block_size}-token block "
                             f"({per_token} bytes per token): raise kv_cache_gib / gpu_memory_fraction")
        return n

    def warm_up_request_paths(self) -> None:
        """Builds what preparing a request would otherwise build on first use while holding the
        GIL (~0.1 s for a 49k vocabulary, more for 150k): llguidance's token trie, the
        control-token matcher, jsonschema's validators. Run before the server says it is ready."""
        import jsonschema  # noqa: F401

        from ..constrained.structured import get_structured
        from ..text.prompt import escaper

        get_structured(self.tokenizer).ll_tokenizer
        escaper(self.tokenizer)

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    group: str | None = None) -> None:
        """`group`: the client request this one belongs to (its n choices share one), for fair
        scheduling; None: its own."""
        check_generates(self.model_config)
        max_tokens = validate_request(prompt_token_ids, params, self.config.max_model_len, self.model_config.vocab_size)
        seq = Sequence(request_id, list(prompt_token_ids), params, max_tokens, group=group or "")
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        seq.detokenizer = self.outputs.new_detokenizer(params)
        self.scheduler.add(seq)

    def add_embedding_request(self, request_id: str, prompt_token_ids: list[int], pooling: PoolingParams,
                              group: str | None = None) -> None:
        """A prefill-only request: its one output carries the pooled hidden states (`embedding`)."""
        validate_embedding(prompt_token_ids, self.config.max_model_len, self.model_config.vocab_size)
        seq = Sequence(request_id, list(prompt_token_ids), SamplingParams(max_tokens=None), 0, group=group or "",
                       pooling=pooling)
        self.scheduler.add(seq)

    @property
    def default_pooling(self) -> str:
        """--pooling, else the model's (GGUF pooling_type, else mean)."""
        return self.config.pooling or self.model_config.pooling

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Ends the step in flight at its next layer, its sequences aborted (shutdown: a long
        prefill must not hold the process past its grace period). Thread-safe."""
        self.runner.interrupt.set()

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outs = [self.outputs.final(seq) for seq in sched.aborted]
        if sched.is_empty:
            return outs
        try:
            result = self.runner.execute(sched)
        except StepInterrupted:
            self.runner.interrupt.clear()
            for seq in sched.seqs:
                seq.aborted = True
                self.scheduler.finish(seq, "abort")
                outs.append(self.outputs.final(seq))
            return outs
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep the engine alive
            log.exception("step failed")
            for seq in sched.seqs:
                seq.error = f"{type(e).__name__}: {e}"
                self.scheduler.finish(seq, "error")
                outs.append(self.outputs.final(seq))
            return outs
        self.scheduler.update(sched)
        self.num_computed_tokens_total += sched.total_tokens
        for seq, vectors in result.pooled:
            outs.append(self._embedded(seq, vectors))
        for seq, tok, lp, err in zip(result.seqs, result.sampled.token_ids, result.sampled.logprobs,
                                     result.sampled.errors):
            try:
                out = self.outputs.process(seq, tok, lp, err)
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("output processing failed for %s", seq.request_id)
                seq.error, seq.finish_reason = f"{type(e).__name__}: {e}", "error"
                out = self.outputs.final(seq)
            if out.finished:
                self.scheduler.finish(seq, out.finish_reason or "stop")
            outs.append(out)
        return outs

    def _embedded(self, seq: Sequence, vectors: list[list[float]]) -> RequestOutput:
        """An embedding sequence's prompt is computed: finish it (blocks freed now), one output."""
        now = time.monotonic()
        seq.metrics.first_token_time = seq.metrics.finished_time = now
        self.scheduler.finish(seq, "stop")
        self.outputs.prompt_tokens_total += seq.num_prompt_tokens
        self.outputs.requests_finished += 1
        self.embeddings_finished += 1
        return RequestOutput(seq.request_id, finished=True, finish_reason="stop",
                             metrics=dataclasses.replace(seq.metrics), embedding=vectors)

    def stats(self) -> EngineStats:
        s, kv, o = self.scheduler, self.kv, self.outputs
        return EngineStats(len(s.running), len(s.waiting), kv.usage, kv.num_blocks, kv.num_free_blocks,
                           kv.hit_tokens, o.prompt_tokens_total, o.generation_tokens_total,
                           s.num_preemptions, o.requests_finished, self.embeddings_finished)

    # ---- offline -----------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationResult]:
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, GenerationResult] = {}
        for p, sp in zip(prompts, plist):
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            rid = f"gen-{uuid.uuid4().hex[:12]}"
            self.add_request(rid, ids, sp)
            results[rid] = GenerationResult(rid, ids)
        while self.has_unfinished():
            for out in self.step():
                r = results.get(out.request_id)
                if r is None:
                    continue
                r.text += out.text
                r.token_ids += out.token_ids
                if out.logprobs:
                    r.logprobs = (r.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    r.finish_reason, r.stop_reason, r.error = out.finish_reason, out.stop_reason, out.error
                    r.metrics = dataclasses.replace(out.metrics)
        return list(results.values())

    def embed(self, prompts: list[str] | list[list[int]],
              pooling: PoolingParams | None = None) -> list[list[list[float]]]:
        """Offline embeddings: each prompt's vectors (see PoolingParams), in order."""
        pooling = pooling or PoolingParams(self.default_pooling)
        rids = []
        for p in prompts:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            rids.append(f"emb-{uuid.uuid4().hex[:12]}")
            self.add_embedding_request(rids[-1], ids, pooling)
        got: dict[str, list[list[float]]] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished and out.embedding is None and out.request_id in rids:
                    raise RuntimeError(f"embedding failed: {out.error or out.finish_reason}")
                if out.embedding is not None:
                    got[out.request_id] = out.embedding
        return [got[r] for r in rids]


__all__ = ["ContextLengthError", "EngineDeadError", "EngineOverloadedError", "EngineStats",
           "GenerationResult", "LLMEngine", "check_generates", "validate_embedding", "validate_request"]
