"""The daemon's Prometheus metrics: requests, tokens, latencies, agents, batch sizes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _AgentsCollector(Collector):
    """Agents in memory and on disk, counted when scraped."""

    def __init__(self, agents: Callable[[], Iterable[Any]]) -> None:
        self._agents = agents

    def collect(self) -> Iterable[GaugeMetricFamily]:
        infos = list(self._agents())
        yield GaugeMetricFamily(
            "edge_infer_agents_resident",
            "Agents (and prompt caches) whose KV is held in memory",
            value=sum(1 for a in infos if a.bytes_in_memory > 0),
        )
        yield GaugeMetricFamily(
            "edge_infer_agents_on_disk",
            "Agents (and prompt caches) with a cache on disk",
            value=sum(1 for a in infos if a.bytes_on_disk > 0),
        )
        yield GaugeMetricFamily(
            "edge_infer_agents_disk_bytes",
            "Bytes of the agents' caches on disk",
            value=sum(a.bytes_on_disk for a in infos),
        )


class Metrics:
    """One registry per app (several apps in one process do not share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edge_infer_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "edge_infer_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.cached_tokens = Counter(
            "edge_infer_cached_tokens", "Prompt tokens whose KV came from a cache", registry=r
        )
        self.generated_tokens = Counter(
            "edge_infer_generated_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            "edge_infer_time_to_first_token_seconds",
            "From the start of a generation to its first token",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.decode_speed = Histogram(
            "edge_infer_decode_tokens_per_second",
            "Decoding speed of a generation (after its first token)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.restore = Histogram(
            "edge_infer_restore_seconds",
            "Starting an agent's turn: its cache taken from memory or restored from disk, "
            "its prompt rendered",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.batch_size = Histogram(
            "edge_infer_batch_size",
            "Sequences in one decoding step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )

    def watch_agents(self, agents: Callable[[], Iterable[Any]]) -> None:
        """Report the agents ``agents()`` lists (AgentInfo) at each scrape."""
        self.registry.register(_AgentsCollector(agents))

    def finished(self, usage: Any) -> None:
        """Count a finished generation's tokens and times."""
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generated_tokens.inc(usage.completion_tokens)
        if usage.ttft_s > 0:
            self.ttft.observe(usage.ttft_s)
        if usage.decode_tokens_per_s > 0:
            self.decode_speed.observe(usage.decode_tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: counts every answered request by route (its path template, so ids
    in paths do not make new series) and status, refusals by the guard included."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            self.metrics.requests.labels(self._route(scope), str(status[0])).inc()

    def _route(self, scope: Scope) -> str:
        for route in self.routes:
            if isinstance(route, Route) and route.matches(scope)[0] == Match.FULL:
                return route.path
        return "unmatched"
