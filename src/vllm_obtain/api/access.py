"""Who may call, and how much they may send: API keys and the request body limit.

Both are plain ASGI middleware, so a stranger or an oversized body is turned away before
routing, parsing or the model are involved.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_obtain.api.errors import AuthenticationError, PayloadTooLargeError, error_response

OPEN_PATHS_HEALTH = "/health"
OPEN_PATH_METRICS = "/metrics"
# The web page and its assets carry no secrets: it asks for a key, then calls the API with it.
OPEN_PAGE = "/"
OPEN_PAGE_ASSETS = "/ui/"


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    """Compare against every key in constant time, so timing reveals neither key nor which."""
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    """Every route needs `Authorization: Bearer <key>`; /health and /metrics only if asked,
    the web page never."""

    def __init__(
        self, app: ASGIApp, *, keys: Sequence[str], auth_health: bool, auth_metrics: bool
    ) -> None:
        self.app = app
        self.keys = list(keys)
        guarded = {OPEN_PATHS_HEALTH: auth_health, OPEN_PATH_METRICS: auth_metrics}
        self.open_prefixes = (OPEN_PAGE_ASSETS, *(p for p, shut in guarded.items() if not shut))

    def is_open(self, path: str) -> bool:
        return path == OPEN_PAGE or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if token
            else "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
        error = AuthenticationError(
            message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await error_response(error)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, by Content-Length or by counting as they come."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # Without a trustworthy length (chunked uploads), read the body here up to the limit,
        # then replay it to the app; later receive() calls (disconnects) pass straight through.
        body: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                body.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            body.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLargeError(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes).",
            code="request_too_large",
        )
        await error_response(error)(scope, receive, send)
