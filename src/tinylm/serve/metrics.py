"""Operating the server: Prometheus metrics (prometheus_client), one access-log line per request, and the
request body limit, as ASGI middleware around the app.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from tinylm.serve.errors import error_body

ACCESS_LOG = logging.getLogger("tinylm.serve.access")
# Latency buckets (seconds) from a fast GPU token to a queued request on a loaded CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCounters(Collector):
    """Counters the engine keeps itself, read when /metrics is scraped (no work on the decode path)."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.stats()
        yield CounterMetricFamily("tinylm_generated_tokens", "Tokens sampled by the engine.", stats["tokens"])
        yield CounterMetricFamily("tinylm_decode_steps", "Decode steps run by the engine.", stats["steps"])
        yield CounterMetricFamily(
            "tinylm_failed_sequences", "Sequences ended by an error of their own.", stats["failed"]
        )


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tinylm_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        Gauge("tinylm_queue_depth", "Sequences waiting for a row.", registry=r).set_function(
            lambda: engine.waiting
        )
        Gauge("tinylm_active_rows", "Sequences being decoded.", registry=r).set_function(
            lambda: engine.active
        )
        Gauge("tinylm_engine_up", "1 while the engine thread decodes, else 0.", registry=r).set_function(
            lambda: float(engine.alive)
        )
        self.ttft = Histogram(
            "tinylm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "tinylm_time_per_output_token_seconds",
            "Between consecutive tokens of one choice, as the server hands them to the client.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCounters(lambda: engine.stats))


class AccessLog:
    """ASGI middleware: one log line per HTTP request once its response ends, and the request counter."""

    def __init__(self, app: Any, metrics: Metrics, routes: frozenset[str] = frozenset()) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes  # routes: paths counted by name

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, sent = time.perf_counter(), [499], [0]  # 499: the client left before any response

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status[0] = 500 if status[0] == 499 else status[0]
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)  # set by the router (a 413 never gets there)
            route = route or (scope["path"] if scope["path"] in self.routes else "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()
            client = scope.get("client") or ("-", 0)
            ACCESS_LOG.info(
                '%s:%s "%s %s" %d %dB %.3fs',
                client[0],
                client[1],
                scope["method"],
                scope["path"],
                status[0],
                sent[0],
                time.perf_counter() - start,
            )


DRAIN_BYTES = 64 * 2**20  # how much of a refused body the server reads (and drops) to answer it cleanly


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets HTTP 413 before the app parses any of it.

    The body (at most `limit` bytes) is read here and handed to the app as one message."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(receive, send, more=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(receive, send, more)
            if not more:
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later: the client leaving (http.disconnect)

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Callable, send: Callable, more: bool) -> None:
        # the rest of the body is read and dropped first (up to DRAIN_BYTES): closing a connection with unread
        # request bytes resets it, and a client still sending would lose the 413 and see a broken connection
        drained = 0
        while more and drained < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        message = (
            f"The request body is larger than this server's limit of {self.limit:,} bytes "
            "(tinylm serve --max-body-bytes)."
        )
        body = json.dumps(error_body(message, "invalid_request_error", None, "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
