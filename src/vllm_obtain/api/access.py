"""Who may call what, and how much they may send: keys and their scopes, the body limit.

Both are plain ASGI middleware, so a stranger or an oversized body is turned away before
routing, parsing or the model are involved.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_obtain.api.errors import (
    AuthenticationError,
    OpenAIError,
    PayloadTooLargeError,
    PermissionDeniedError,
    error_response,
)
from vllm_obtain.api.keys import ANONYMOUS, Caller, Keyring

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
ADMIN_PREFIX = "/admin/"
# The web page and its assets carry no secrets: it asks for a key, then calls the API with it.
PAGE_PATH = "/"
PAGE_ASSETS = "/ui/"
# Where the ASGI scope's state keeps the request's Caller (read by caller_of).
CALLER = "caller"


def caller_of(scope: Scope) -> Caller:
    """Who sent the request, as AccessMiddleware found out (anonymous without keys)."""
    caller = scope.get("state", {}).get(CALLER)
    return caller if isinstance(caller, Caller) else ANONYMOUS


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


# Headers a reverse proxy adds: a loopback peer that sends one speaks for someone else.
FORWARDING_HEADERS = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-real-ip"}
)


def is_local_client(scope: Scope) -> bool:
    """A loopback peer (or a Unix socket's, which has no address) that is not a proxy
    passing on another client's request."""
    if any(name in FORWARDING_HEADERS for name, _ in scope["headers"]):
        return False
    client = scope.get("client")
    if not client:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return bool((mapped or address).is_loopback)


class AccessMiddleware:
    """Keys and what each may call.

    With keys, every route needs `Authorization: Bearer <key>` (/health and /metrics only if
    asked, the web page never); /admin/* and a protected /metrics need an admin key. Without
    any key the inference API is open and /admin/* serves this machine's own clients only,
    so a server on 0.0.0.0 cannot be emptied or made to download from across the network."""

    def __init__(
        self, app: ASGIApp, *, keyring: Keyring, auth_health: bool, auth_metrics: bool
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.auth_health = auth_health
        self.admin_paths = (ADMIN_PREFIX, METRICS_PATH) if auth_metrics else (ADMIN_PREFIX,)
        guarded = {HEALTH_PATH: auth_health, METRICS_PATH: auth_metrics}
        self.open_prefixes = (PAGE_ASSETS, *(p for p, shut in guarded.items() if not shut))

    def is_open(self, path: str) -> bool:
        return path == PAGE_PATH or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        try:
            caller = self._caller(scope, admin_only=path.startswith(self.admin_paths))
        except OpenAIError as refused:
            if not self.is_open(path):
                await error_response(refused)(scope, receive, send)
                return
            caller = ANONYMOUS
        scope.setdefault("state", {})[CALLER] = caller
        await self.app(scope, receive, send)

    def _caller(self, scope: Scope, *, admin_only: bool) -> Caller:
        """The request's caller, or the refusal (401 for a missing or wrong key, 403 for a
        key without the scope)."""
        if self.keyring.empty:
            if admin_only and not is_local_client(scope):
                raise PermissionDeniedError(
                    f"{scope['path']} is served to this machine only on a server without "
                    "keys: start it with --admin-key KEY to manage it from elsewhere.",
                    code="admin_local_only",
                )
            return ANONYMOUS
        token = bearer_token(scope)
        caller = self.keyring.lookup(token) if token else None
        if caller is None:
            message = (
                "Incorrect API key provided."
                if token
                else "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
            raise AuthenticationError(
                message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
        if admin_only and not caller.admin:
            hint = (
                "use an admin key"
                if self.keyring.has_admin
                else "this server has none: start it with --admin-key KEY"
            )
            raise PermissionDeniedError(
                f"This key may not call {scope['path']}: it needs an admin key ({hint}).",
                code="admin_key_required",
            )
        return caller


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
