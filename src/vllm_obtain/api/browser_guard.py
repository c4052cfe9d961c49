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
# (localhost, a container's service name, this machine's name) and these suffixes (Kubernetes'
# svc.namespace.svc.cluster.local, Consul's service.consul among them).
PRIVATE_SUFFIXES = (
    ".localhost", ".local", ".internal", ".home.arpa", ".lan", ".svc", ".consul",
)  # fmt: skip
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class BadHostError(ValueError):
    """A Host or Origin that is no host name at all ('[', 'a b')."""


def split_host(host: str) -> tuple[str, int | None]:
    """'Example.com:8001' -> ('example.com', 8001); IPv6 in brackets; a bad port is None.
    Raises BadHostError for what no browser would send."""
    try:
        parts = urlsplit(f"//{host}")
        hostname = parts.hostname or ""
    except ValueError:
        raise BadHostError(host) from None
    if any(c.isspace() or c in "/?#@" for c in hostname):
        raise BadHostError(host)
    try:
        port = parts.port
    except ValueError:
        port = None
    return hostname.rstrip("."), port


def first_forwarded(headers: dict[bytes, bytes], name: bytes) -> str:
    """A header a chain of proxies may have made a list: the first entry, the client's."""
    return headers.get(name, b"").decode("latin-1").split(",")[0].strip()


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

    def allows(self, name: str) -> bool:
        return (
            self.off
            or not name  # HTTP/1.0 without a Host: not a browser
            or is_ip(name)  # a rebinding needs a name; an IP is the browser's origin as is
            or "." not in name
            or name in self.exact
            or name.endswith(self.suffixes)
        )

    def refused_name(self, scope: Scope) -> str | None:
        """The name the browser called that is not ours, or None. A proxy's X-Forwarded-Host
        is checked too: behind one that sends `Host: 127.0.0.1`, the name a rebinding page
        used is there."""
        headers = dict(scope["headers"])
        for header in (b"host", b"x-forwarded-host"):
            called = first_forwarded(headers, header)
            try:
                name, _ = split_host(called)
            except BadHostError:
                return called
            if not self.allows(name):
                return name
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.off:
            name = self.refused_name(scope)
            if name is not None:
                error = PermissionDeniedError(
                    f"This server is not called {name!r}. If it is yours (behind a proxy, "
                    f"or a DNS name of your own), start the server with --allowed-host {name}.",
                    code="host_not_allowed",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def origin_key(origin: str) -> tuple[str, int | None] | None:
    """An Origin header as (host, port), its scheme's default port filled in; None for
    'null' (a sandboxed frame, a file://) or anything unreadable: nobody's origin."""
    try:
        parts = urlsplit(origin)
        if not parts.scheme or not parts.hostname:
            return None
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

    def is_own(self, origin: str, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        """Whether `origin` is this server as the browser called it (or an allowed one)."""
        key = origin_key(origin)
        if key is None:
            return False
        if self.any_origin or key in self.allowed:
            return True
        # Behind a proxy the browser called the proxy's name, which the proxy passes on here
        # (with its scheme, if it says it: else the page's own is taken). A Host without a
        # port is on its scheme's default one.
        scheme = scope.get("scheme", "http")
        origin_scheme = urlsplit(origin).scheme
        forwarded_scheme = first_forwarded(headers, b"x-forwarded-proto") or origin_scheme
        called_as = (
            (b"x-forwarded-host", forwarded_scheme),
            (b"host", scheme),
        )
        for header, called_scheme in called_as:
            try:
                host, port = split_host(first_forwarded(headers, header))
            except BadHostError:
                continue
            if host and (host, port or DEFAULT_PORTS.get(called_scheme)) == key:
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not self.is_own(origin, scope, headers):
            error = PermissionDeniedError(
                f"Requests from the web page at {origin} are refused: a page may call this "
                f"server only if the server is started with --cors-origin {origin}.",
                code="origin_not_allowed",
            )
            await error_response(error)(scope, receive, send)
            return
        declared = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        is_json = declared == b"application/json" or declared.endswith(b"+json")
        if not is_json and not declared.startswith(b"multipart/") and has_body(headers):
            if origin:
                not_json = UnsupportedMediaTypeError(
                    "Send the body as JSON, with 'Content-Type: application/json'.",
                    code="unsupported_media_type",
                )
                await error_response(not_json)(scope, receive, send)
                return
            # `curl -d '{...}'` says application/x-www-form-urlencoded; FastAPI would refuse
            # it as "not a valid dictionary". It is read as the JSON it is. (In place: the
            # router notes the matched route on this very scope, for the metrics.)
            kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*kept, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)
