"""/metrics of the router: every worker's series with a `model` label, and the router's own.

Each loaded worker's /metrics is fetched when Prometheus scrapes (concurrently, a few seconds at
most; a worker that does not answer is left out of that scrape) and its samples are re-exposed
with `model="<id>"` added, families merged across workers. The router adds per model: its status
(one-hot), requests in flight and waiting for it, the worker's resident memory, how long its last
load took, and counters of loads and unloads by outcome and reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..metrics import PREFIX
from .manager import ManagedModel, ModelManager, Status
from .proxy import fetch


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.loads = Counter(PREFIX + "router_model_loads", "Model loads by outcome", ["model", "outcome"],
                             registry=self.registry)
        self.unloads = Counter(PREFIX + "router_model_unloads", "Model unloads by reason (lru, idle, admin, crash)",
                               ["model", "reason"], registry=self.registry)

    def on_event(self, model: str, event: str) -> None:
        if event == "loaded":
            self.loads.labels(model, "ok").inc()
        elif event == "load_failed":
            self.loads.labels(model, "failed").inc()
        elif event == "crashed":
            self.unloads.labels(model, "crash").inc()
        elif event.startswith("unloaded_"):
            self.unloads.labels(model, event.removeprefix("unloaded_")).inc()

    async def render(self, manager: ModelManager, only: ManagedModel | None = None) -> bytes:
        models = [only] if only is not None else list(manager.models.values())
        families = _state(models) + await _workers([m for m in models if m.status is Status.LOADED])
        out = generate_latest(self.registry) if only is None else b""
        snap = CollectorRegistry(auto_describe=False)
        snap.register(_Snapshot(families))
        return out + generate_latest(snap)


def _state(models: list[ManagedModel]) -> list[Metric]:
    status = GaugeMetricFamily(PREFIX + "router_model_status", "1 for the model's current status",
                               labels=["model", "status"])
    gauges = {
        "requests_in_flight": ("Requests being answered by the model", lambda m: m.in_flight),
        "requests_waiting": ("Requests waiting for the model to load", lambda m: m.waiting),
        "memory_rss_bytes": ("Resident memory of the model's process",
                             lambda m: m.process.rss_bytes() if m.process is not None else 0),
        "load_seconds": ("Seconds the model's last load took", lambda m: m.load_seconds),
    }
    out: list[Metric] = [status]
    for m in models:
        for s in Status:
            status.add_metric([m.id, s.value], 1.0 if m.status is s else 0.0)
    for name, (doc, value) in gauges.items():
        g = GaugeMetricFamily(PREFIX + "router_model_" + name, doc, labels=["model"])
        for m in models:
            g.add_metric([m.id], float(value(m)))
        out.append(g)
    return out


async def _scrape(m: ManagedModel) -> list[Metric]:
    if m.process is None:
        return []
    r = await fetch(m.process, "/metrics")
    if r is None or r.status_code != 200:
        return []
    families = []
    for fam in text_string_to_metric_families(r.text):
        out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        for s in fam.samples:
            out.add_sample(s.name, {**s.labels, "model": m.id}, s.value, s.timestamp, s.exemplar)
        families.append(out)
    return families


async def _workers(models: list[ManagedModel]) -> list[Metric]:
    merged: dict[str, Metric] = {}
    for fams in await asyncio.gather(*[_scrape(m) for m in models]):
        for fam in fams:
            if fam.name in merged:
                merged[fam.name].samples.extend(fam.samples)
            else:
                merged[fam.name] = fam
    return list(merged.values())
