"""Prometheus metrics: what the server is doing, scraped from GET /metrics.

Request counts, latency and token counters are recorded as requests finish (api/middleware.py)
and as their tokens stream (`observe`); engine gauges are read from the engines at scrape time.
Each app has its own CollectorRegistry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vllm_obtain.contract import ReplicatedEngine
from vllm_obtain.core.generation import Deltas
from vllm_obtain.core.registry import ModelRegistry

PREFIX = "vllm_obtain"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1),
    *(0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0),
)

router = APIRouter(tags=["metrics"])


@dataclass
class RequestRecord:
    """What one HTTP request did, filled in as it goes; logged and counted when it ends."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    prompt: str | None = None  # logged only when the operator enables it
    key: str = ""  # the name of the key it came with (never the key itself)

    @property
    def latency(self) -> float:
        return time.perf_counter() - self.started


class EngineCollector:
    """Engine gauges, read when Prometheus scrapes rather than pushed on every step."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "engine"]
        up = GaugeMetricFamily(f"{PREFIX}_engine_up", "1 when the engine can serve", labels=labels)
        running = GaugeMetricFamily(
            f"{PREFIX}_engine_running_sequences", "sequences being decoded", labels=labels
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_requests_queued", "admitted sequences waiting for the engine", labels=labels
        )
        kv = GaugeMetricFamily(
            f"{PREFIX}_engine_kv_cache_usage_ratio", "share of the KV cache in use", labels=labels
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_engine_restarts", "engine restarts after a crash or hang", labels=labels
        )
        for model in self._models.all():
            values = [model.id, model.engine.name]
            stats = model.engine.stats()
            up.add_metric(values, 1.0 if model.state == "ready" else 0.0)
            running.add_metric(values, float(stats.get("running", 0)))
            queued.add_metric(values, float(model.waiting))
            if "kv_cache_usage" in stats:
                kv.add_metric(values, float(stats["kv_cache_usage"]))
            restarts.add_metric(values, float(stats.get("restarts", 0)))
        yield from (up, running, queued, kv, restarts)
        yield from self._replicas()
        yield from self._residency()

    def _replicas(self) -> Iterator[Metric]:
        """Each replica of a model served by several (on a cluster), labelled by replica."""
        labels = ["model", "replica", "node"]
        up = GaugeMetricFamily(f"{PREFIX}_replica_up", "1 when the replica serves", labels=labels)
        running = GaugeMetricFamily(
            f"{PREFIX}_replica_running_sequences", "sequences the replica decodes", labels=labels
        )
        kv = GaugeMetricFamily(
            f"{PREFIX}_replica_kv_cache_usage_ratio", "share of its KV cache in use", labels=labels
        )
        requests = CounterMetricFamily(
            f"{PREFIX}_replica_requests", "generations the replica has started", labels=labels
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_replica_engine_restarts", "its engine's restarts", labels=labels
        )
        for model in self._models.all():
            if not isinstance(model.engine, ReplicatedEngine):
                continue
            for replica in model.engine.replicas():
                values = [model.id, replica.replica_id, replica.node]
                stats = replica.stats
                up.add_metric(values, 1.0 if replica.state == "ready" else 0.0)
                running.add_metric(values, float(stats.get("running", 0)))
                if "kv_cache_usage" in stats:
                    kv.add_metric(values, float(stats["kv_cache_usage"]))
                requests.add_metric(values, float(stats.get("requests", 0)))
                restarts.add_metric(values, float(stats.get("restarts", 0)))
        yield from (up, running, kv, requests, restarts)

    def _residency(self) -> Iterator[Metric]:
        """Every servable model: whether it is loaded, what it holds, its loads and unloads."""
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded", "1 while the model is loaded", labels=["model", "engine"]
        )
        memory = GaugeMetricFamily(
            f"{PREFIX}_model_memory_bytes",
            "memory its engine process holds (its estimate while loading)",
            labels=["model", "engine"],
        )
        loads = CounterMetricFamily(f"{PREFIX}_model_loads", "model loads", labels=["model"])
        unloads = CounterMetricFamily(
            f"{PREFIX}_model_unloads",
            "model unloads, by reason: idle, memory, count, admin",
            labels=["model", "reason"],
        )
        for entry in self._models.entries():
            values = [entry.id, entry.source.engine]
            loaded.add_metric(values, 1.0 if entry.state == "loaded" else 0.0)
            if entry.state in ("loading", "loaded", "unloading"):
                memory.add_metric(values, float(entry.charge))
            loads.add_metric([entry.id], float(entry.loads))
            for reason, count in entry.unloads.items():
                unloads.add_metric([entry.id, reason], float(count))
        yield from (loaded, memory, loads, unloads)


class ServerMetrics:
    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by the name of the key that sent them",
            ["route", "status", "model", "key"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "HTTP requests being answered",
            ["route"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "end-to-end latency, until the last byte",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "from the request's arrival to its first text",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "time between generated tokens of one choice",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "prompt tokens processed, by key name",
            ["model", "key"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens",
            "tokens generated, by key name",
            ["model", "key"],
            registry=registry,
        )
        registry.register(EngineCollector(models))

    def finish(self, route: str, record: RequestRecord) -> None:
        model = record.model or ""
        self.requests.labels(route, str(record.status), model, record.key).inc()
        self.duration.labels(route, model).observe(record.latency)
        if record.model is not None:
            self.prompt_tokens.labels(model, record.key).inc(record.prompt_tokens)
            self.generation_tokens.labels(model, record.key).inc(record.completion_tokens)

    async def observe(self, deltas: Deltas, record: RequestRecord) -> Deltas:
        """Pass the deltas through, timing the first one and the gaps between tokens."""
        model = record.model or ""
        produced: dict[int, int] = {}
        last_at: dict[int, float] = {}
        try:
            async for delta in deltas:
                now = time.perf_counter()
                if record.first_token_at is None:
                    record.first_token_at = now
                    self.ttft.labels(model).observe(now - record.started)
                new = delta.completion_tokens - produced.get(delta.index, 0)
                if delta.index in last_at and new > 0:
                    gap = (now - last_at[delta.index]) / new
                    for _ in range(new):
                        self.inter_token.labels(model).observe(gap)
                produced[delta.index] = delta.completion_tokens
                last_at[delta.index] = now
                record.completion_tokens = sum(produced.values())
                yield delta
        finally:
            await deltas.aclose()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    server_metrics: ServerMetrics = request.app.state.metrics
    return Response(generate_latest(server_metrics.registry), media_type=CONTENT_TYPE_LATEST)
