"""Around every request: its id, its log line, its metrics.

Plain ASGI middleware rather than BaseHTTPMiddleware, which buffers streaming responses and
gets in the way of client-disconnect cancellation. The log line and the metrics are written
when the response has really ended: for a stream, after its last event.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from loguru import logger
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_obtain.api.access import caller_of
from vllm_obtain.api.metrics import RequestRecord, ServerMetrics

REQUEST_ID_HEADER = "x-request-id"
# request.state's list of callables run once the response has ended (request_scope).
ON_RESPONSE_END = "on_response_end"
# request.state's RequestRecord: what the request did, for its log line and the metrics.
RECORD = "record"
# Probes and scrapes arrive every few seconds; their lines are DEBUG so they do not drown the rest.
QUIET_PATHS = ("/health", "/metrics")
# So do the dashboard's reads (an open page polls), and the page's own files.
QUIET_READS = ("/admin/models", "/admin/system", "/ui/")


def is_quiet(method: str, path: str) -> bool:
    """Whether a request's log line is DEBUG: probes, scrapes, and reads a web page repeats."""
    reads = method in ("GET", "HEAD") and (path == "/" or path.startswith(QUIET_READS))
    return reads or path.startswith(QUIET_PATHS)


# The routes whose requests last long enough for an in-flight gauge to mean something.
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"}
)


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServerMetrics,
        log_prompts: bool = False,
        request_id_header: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.request_id_header = request_id_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        record = RequestRecord(incoming[:128] or uuid.uuid4().hex, scope["method"], scope["path"])
        state = scope.setdefault("state", {})
        state["request_id"], state[RECORD] = record.request_id, record
        on_end: list[Callable[[], None]] = []
        state[ON_RESPONSE_END] = on_end

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if self.request_id_header:
                    MutableHeaders(scope=message)[REQUEST_ID_HEADER] = record.request_id
            await send(message)

        path = scope["path"]
        in_flight = self.metrics.in_flight.labels(path if path in GENERATION_PATHS else "other")
        with logger.contextualize(request_id=record.request_id):
            in_flight.inc()
            try:
                await self.app(scope, receive, send_with_id)
            except BaseException:
                record.status = record.status or 500
                raise
            finally:
                record.key = caller_of(scope).name
                for callback in on_end:
                    callback()
                in_flight.dec()
                # The route's template, known once the router matched: a bounded label set.
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.finish(route, record)
                self._log(record)

    def _log(self, record: RequestRecord) -> None:
        fields = {
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "latency_ms": round(record.latency * 1000, 1),
        }
        if record.key:
            fields["key"] = record.key
        if record.model is not None:
            fields |= {
                "model": record.model,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
            }
        if record.first_token_at is not None:
            fields["ttft_ms"] = round((record.first_token_at - record.started) * 1000, 1)
        if self.log_prompts and record.prompt is not None:
            fields["prompt"] = record.prompt
        level = "DEBUG" if is_quiet(record.method, record.path) else "INFO"
        tokens = (
            f" {record.model} {record.prompt_tokens}+{record.completion_tokens} tokens"
            if record.model is not None
            else ""
        )
        by = f" by {record.key}" if record.key else ""
        logger.bind(**fields).log(
            level,
            "{} {} {}{} {:.0f}ms{}",
            record.method,
            record.path,
            record.status,
            tokens,
            fields["latency_ms"],
            by,
        )
