"""What keeps a web page the user happens to open from driving this server.

Two holes, two guards, as Ollama (CVE-2024-28224), llama.cpp's server and vLLM close them:
- DNS rebinding: a page at evil.example whose name then resolves to 127.0.0.1 is, to the
  browser, same-origin with our server, and may read its answers. Its requests carry
  `Host: evil.example`, so a Host that is no name of ours is refused.
- Cross-site requests: a page may POST a "simple" request (text/plain, form data) anywhere
  without a preflight. Such requests always carry an Origin; one that is not ours (nor allowed
  by --cors-origin) is refused before it can change anything, and a body that is not declared
  as JSON is read as JSON only from clients that send no Origin (curl -d, SDKs).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_obtain.api.errors import (
    PermissionDeniedError,
    UnsupportedMediaTypeError,
    error_response,
)

ANY = "*"
# Names that never come from public DNS, so no other site can rebind them: single-label names
# (localhost, a container's service name, this machine's name) and these suffixes.
PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(host: str) -> tuple[str, int | None]:
    """'Example.com:8001' -> ('example.com', 8001); IPv6 in brackets; a bad port is None."""
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or "").rstrip("."), port


def machine_names() -> frozenset[str]:
    """This machine's own names, as a LAN client may call it."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(name.lower().rstrip(".") for name in names if name)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheckMiddleware:
    """Refuse a Host that is not an IP address, a private name, this machine's name, or one
    of --allowed-host (exact, or `*.example.com`)."""

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        allowed = [name.strip().lower().rstrip(".") for name in allowed]
        self.off = ANY in allowed
        self.exact = frozenset(name for name in allowed if not name.startswith("*.")) | (
            machine_names()
        )
        self.suffixes = (*PRIVATE_SUFFIXES, *(name[1:] for name in allowed if name[:2] == "*."))

    def allows(self, host: str) -> bool:
        name, _ = split_host(host)
        return (
            self.off
            or not name  # HTTP/1.0 without a Host: not a browser
            or is_ip(name)  # a rebinding needs a name; an IP is the browser's origin as is
            or "." not in name
            or name in self.exact
            or name.endswith(self.suffixes)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allows(host):
                name, _ = split_host(host)
                error = PermissionDeniedError(
                    f"This server is not called {name!r}. If it is yours (behind a proxy, "
                    f"or a DNS name of your own), start the server with --allowed-host {name}.",
                    code="host_not_allowed",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def origin_key(origin: str) -> tuple[str, int | None] | None:
    """An Origin header as (host, port), its scheme's default port filled in."""
    parts = urlsplit(origin)
    if not parts.scheme or not parts.hostname:
        return None  # 'null' (a sandboxed frame, a file://) is nobody's origin
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return parts.hostname.lower().rstrip("."), port


def has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


class CrossSiteMiddleware:
    """Refuse requests that change something from another site's page, and take bodies whose
    Content-Type is not JSON as JSON only from clients that are not browsers."""

    def __init__(self, app: ASGIApp, *, cors_origins: Iterable[str]) -> None:
        self.app = app
        origins = list(cors_origins)
        self.any_origin = ANY in origins
        self.allowed = frozenset(key for o in origins if (key := origin_key(o)) is not None)

    def is_own(self, origin: str, scope: Scope) -> bool:
        """Whether `origin` is this server as the browser called it (or an allowed one)."""
        key = origin_key(origin)
        if key is None:
            return False
        if self.any_origin or key in self.allowed:
            return True
        headers = dict(scope["headers"])
        # Behind a proxy the browser called the proxy's name, which the proxy passes on here.
        for header in (b"x-forwarded-host", b"host"):
            # A chain of proxies lists every name; the first is the one the browser called.
            called = headers.get(header, b"").decode("latin-1").split(",")[0].strip()
            host, port = split_host(called)
            if host == key[0] and (port is None or port == key[1]):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not self.is_own(origin, scope):
            error = PermissionDeniedError(
                f"Requests from the web page at {origin} are refused: a page may call this "
                f"server only if the server is started with --cors-origin {origin}.",
                code="origin_not_allowed",
            )
            await error_response(error)(scope, receive, send)
            return
        declared = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        is_json = declared == b"application/json" or declared.endswith(b"+json")
        if not is_json and not declared.startswith(b"multipart/"):
            if origin and has_body(headers):
                error415 = UnsupportedMediaTypeError(
                    "Send the body as JSON, with 'Content-Type: application/json'.",
                    code="unsupported_media_type",
                )
                await error_response(error415)(scope, receive, send)
                return
            # `curl -d '{...}'` says application/x-www-form-urlencoded; FastAPI would refuse
            # it as "not a valid dictionary". It is read as the JSON it is.
            kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
