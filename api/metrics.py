"""Prometheus metrics on a private registry (two apps in one process never share counters).

Token counters and latency histograms are fed by the API as requests finish (so they add up to
what clients were served); queue and KV gauges are read from `engine.stats()` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from engine.core.engine import EngineStats

disable_created_metrics()  # no *_created series: they double the output and no dashboard uses them

PREFIX = "llamatron:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Reads the engine's live numbers when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.stats()
        except Exception:  # engine still loading or gone: expose nothing rather than fail the scrape
            return
        gauges = {
            "num_requests_running": ("Requests in the running batch", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled", s.num_waiting),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use (0..1)", s.kv_usage),
            "kv_cache_blocks_total": ("KV-cache blocks in the pool", s.total_blocks),
            "kv_cache_blocks_free": ("KV-cache blocks free", s.free_blocks),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], float(value))
            yield g
        counters = {
            "prefix_cache_hit_tokens": ("Prompt tokens served from the prefix cache", s.prefix_cache_hit_tokens),
            "num_preemptions": ("Sequences preempted for lack of KV blocks", s.num_preemptions),
            "engine_prompt_tokens": ("Prompt tokens the engine computed (after prefix-cache hits)",
                                     s.prompt_tokens_total),
            "engine_generation_tokens": ("Tokens the engine generated (aborted requests included)",
                                         s.generation_tokens_total),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(PREFIX + name, doc)
            c.add_metric([], float(value))
            yield c


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated for finished requests",
                                         registry=r)
        self.requests = Counter(PREFIX + "requests", "Finished engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        # embeddings (api/embeddings.py): one count per input, apart from the generation counters above
        self.embedding_inputs = Counter(PREFIX + "embedding_inputs", "Embedding inputs answered, by outcome",
                                        ["outcome"], registry=r)
        self.embedding_tokens = Counter(PREFIX + "embedding_prompt_tokens", "Prompt tokens of embedded inputs",
                                        registry=r)
        self.embedding_latency = Histogram(PREFIX + "embedding_request_latency_seconds",
                                           "Time from arrival to the answer of one embeddings request",
                                           buckets=E2E_BUCKETS, registry=r)
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats))

    def observe_request(self, prompt_tokens: int, generated: int, finish_reason: str,
                        ttft: float | None, e2e: float) -> None:
        """One finished engine request (one choice)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.requests.labels(finish_reason=finish_reason or "unknown").inc()
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)

    def observe_embeddings(self, inputs: int, prompt_tokens: int, outcome: str, latency_s: float) -> None:
        """One embeddings request of `inputs` inputs: "ok", "error", "abort" (client gone or shutdown)."""
        self.embedding_inputs.labels(outcome=outcome).inc(inputs)
        self.embedding_tokens.inc(prompt_tokens)
        self.embedding_latency.observe(latency_s)

    def observe_itl(self, gap_s: float, n_tokens: int) -> None:
        """`n_tokens` arrived together after `gap_s`: each counts as gap/n."""
        if n_tokens > 0:
            per = gap_s / n_tokens
            for _ in range(n_tokens):
                self.itl.observe(per)

    def render(self) -> bytes:
        return generate_latest(self.registry)
