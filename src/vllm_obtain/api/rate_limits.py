"""Requests and tokens per minute, per key (per client address on a server without keys).

Token buckets, as OpenAI's limits behave: a full bucket holds the whole per-minute allowance
and refills continuously. A request takes one request; its tokens (prompt and generated) are
charged when it ends, so the token bucket may go below zero, and new requests wait until it
is above again. Every /v1 answer carries OpenAI's `x-ratelimit-*` headers, and a refusal a
`Retry-After`, which the official SDKs read to time their retries.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_obtain.api.access import caller_of
from vllm_obtain.api.errors import RateLimitError, error_response
from vllm_obtain.api.metrics import RequestRecord
from vllm_obtain.api.middleware import RECORD

LIMITED_PREFIX = "/v1/"
# Buckets kept at most, the least recently used forgotten first (a forgotten one starts full
# again): many addresses, bounded memory.
MAX_BUCKETS = 10_000
PERIOD_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour"}
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


@dataclass(frozen=True)
class Rate:
    amount: int
    per_seconds: float

    @property
    def per_second(self) -> float:
        return self.amount / self.per_seconds


@dataclass
class Bucket:
    rate: Rate
    level: float
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.rate.amount, self.level + elapsed * self.rate.per_second)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds `level` (0 if it does)."""
        return max(0.0, (level - self.level) / self.rate.per_second)


def duration_text(seconds: float) -> str:
    """OpenAI's way of writing a reset time: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 10:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class RateLimiter:
    """The buckets of every caller, for requests and tokens (either may be off)."""

    def __init__(
        self,
        *,
        requests: Rate | None,
        tokens: Rate | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"requests": requests, "tokens": tokens}
        self.clock = clock
        self.buckets: OrderedDict[tuple[str, str], Bucket] = OrderedDict()

    def bucket(self, kind: str, who: str) -> Bucket | None:
        rate = self.limits[kind]
        if rate is None:
            return None
        found = self.buckets.get((kind, who))
        if found is None:
            while len(self.buckets) >= MAX_BUCKETS:
                self.buckets.popitem(last=False)
            found = self.buckets[(kind, who)] = Bucket(rate, float(rate.amount), self.clock())
        self.buckets.move_to_end((kind, who))
        found.refill(self.clock())
        return found

    def admit(self, who: str) -> tuple[str, float] | None:
        """Take one request from `who`'s allowance; or, refused, which limit and the seconds
        until it allows one."""
        requests, tokens = self.bucket("requests", who), self.bucket("tokens", who)
        if requests is not None and requests.level < 1:
            return "requests", requests.seconds_until(1.0)
        if tokens is not None and tokens.level < 1:
            return "tokens", tokens.seconds_until(1.0)
        if requests is not None:
            requests.level -= 1
        return None

    def charge_tokens(self, who: str, count: int) -> None:
        if (tokens := self.bucket("tokens", who)) is not None:
            tokens.level -= count

    def period(self, kind: str) -> str:
        """The period a limit is counted over, in words: 'minute'."""
        rate = self.limits[kind]
        seconds = rate.per_seconds if rate is not None else 60.0
        return PERIOD_NAMES.get(seconds) or duration_text(seconds)

    def headers(self, who: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for `who`, as things stand."""
        found: dict[str, str] = {}
        for kind in self.limits:
            bucket = self.bucket(kind, who)
            if bucket is None:
                continue
            found[f"x-ratelimit-limit-{kind}"] = str(bucket.rate.amount)
            found[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
            reset = bucket.seconds_until(bucket.rate.amount)
            found[f"x-ratelimit-reset-{kind}"] = duration_text(reset)
        return found


def client_identity(scope: Scope) -> str:
    """Whose allowance a request takes: its key's name, else its client address (an IPv6
    client's /64, which one host may fill with addresses)."""
    name = caller_of(scope).name
    if name:
        return name
    client = scope.get("client")
    if not client:
        return "address local"
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return f"address {client[0]}"
    if address.version == 6 and not getattr(address, "ipv4_mapped", None):
        return f"address {ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"address {address}"


class RateLimitMiddleware:
    """Refuses /v1 requests past the caller's allowance with a 429; charges their tokens."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(LIMITED_PREFIX):
            await self.app(scope, receive, send)
            return
        who = client_identity(scope)
        refused = self.limiter.admit(who)
        if refused is not None:
            await self._refuse(*refused, who, scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(self.limiter.headers(who))
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            record = scope.get("state", {}).get(RECORD)
            if isinstance(record, RequestRecord):
                used = record.prompt_tokens + record.completion_tokens
                self.limiter.charge_tokens(who, used)

    async def _refuse(
        self, kind: str, wait: float, who: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = self.limiter.headers(who)
        headers["retry-after"] = str(math.ceil(wait))
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        limit = headers[f"x-ratelimit-limit-{kind}"]
        error = RateLimitError(
            f"Rate limit reached for {who} on {kind}: {limit} per {self.limiter.period(kind)}. "
            f"Please try again in {duration_text(wait)}.",
            code="rate_limit_exceeded",
            headers=headers,
        )
        await error_response(error)(scope, receive, send)
