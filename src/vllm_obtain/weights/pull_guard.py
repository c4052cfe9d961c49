"""What a pull by URL may reach and how much it may write.

A client of POST /admin/pull chooses the URL, so without this the server fetches whatever it is
pointed at onto its disk: cloud metadata at 169.254.169.254, services on localhost or the
private network (a server-side request forgery), or a file larger than the disk. So: https
only unless allowed; no loopback, private, link-local, multicast, unspecified or reserved
address unless its host is named as allowed; and a size cap.

The address is checked where the connection is made and the connection goes to the very
address checked, so a DNS answer that changes between a check and the connect (rebinding)
gains nothing. Every redirect opens its connection the same way. Proxies from the environment
are not used: through a proxy we could not see the address finally reached."""

from __future__ import annotations

import http.client
import ipaddress
import shutil
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from vllm_obtain.weights.pull_checks import PullError

DISK_MARGIN_BYTES = 1 << 30  # left free when no --pull-max-size is given
# The kinds of address a pull may not reach, in the order they are named in a refusal.
_REFUSED_KINDS = (
    "loopback", "link_local", "multicast", "unspecified", "reserved", "site_local", "private",
)  # fmt: skip
# IPv6 prefixes that carry an IPv4 address a network may route to (NAT64 on a cloud VPC).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class PullPolicy:
    """What pulls by URL may do; the default is the strict one (https, public addresses,
    the free disk less DISK_MARGIN_BYTES)."""

    allow_http: bool = False
    allow_hosts: frozenset[str] = frozenset()  # host names as in URLs, or IP addresses
    max_bytes: int | None = None  # None: the free disk of models/ less DISK_MARGIN_BYTES

    def allows_host(self, host: str, address: str) -> bool:
        """Whether `host` (or the address it resolved to) was named by --pull-allow-host."""
        return bool({_canonical(host), _canonical(address)} & {*map(_canonical, self.allow_hosts)})


STRICT = PullPolicy()  # what a pull may do when nothing more is allowed


def _canonical(host: str) -> str:
    """One spelling per host: lower case, IPv6 without brackets, addresses compressed."""
    text = host.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.rstrip(".")  # a name (example.org. is example.org)


def refused_kind(address: str) -> str | None:
    """Why no pull may connect to `address` ('loopback', 'link-local'...), or None when it
    is a public one."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 and 64:ff9b::a9fe:a9fe reach the IPv4 address inside them.
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:  # 2002::/16 carries an IPv4 address too
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for kind in _REFUSED_KINDS:
        if getattr(ip, f"is_{kind}", False):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"  # 100.64.0.0/10, carrier-grade NAT


def check_address(host: str, address: str, policy: PullPolicy) -> None:
    """Refuse `address` (what `host` resolved to) unless it is public or the host allowed."""
    kind = refused_kind(address)
    if kind is None or policy.allows_host(host, address):
        return
    named = _canonical(host) == _canonical(address)
    what = (
        f"{host} is a {kind} address"
        if named
        else f"{host} resolves to {address}, a {kind} address"
    )
    raise PullError(
        f"{what}, which a pull may not reach: allow it with "
        f"--pull-allow-host {_canonical(host)} (OBTAIN_PULL_ALLOW_HOSTS) if it is meant"
    )


def check_url(url: str, policy: PullPolicy, *, redirected_from: str | None = None) -> None:
    """Refuse a URL the policy forbids before fetching it, naming every flag it would need;
    its addresses are checked again at the connect, which is what counts."""
    parts = urlsplit(url)
    via = f" (redirected from {redirected_from})" if redirected_from else ""
    problems = []
    if parts.scheme != "https" and not (parts.scheme == "http" and policy.allow_http):
        problems.append(
            f"'{parts.scheme}:' is refused: pulls take https:// URLs (http:// too with "
            "--pull-allow-http)"
        )
    host = parts.hostname
    if not host:
        raise PullError(f"{url}{via}: it names no host")
    try:
        addresses = _resolve(host)
    except OSError:  # not resolvable now: the download says so, with its retries
        addresses = []
    for address in addresses:
        try:
            check_address(host, address, policy)
        except PullError as refusal:
            problems.append(str(refusal))
            break
    if problems:
        raise PullError(f"{url}{via}: " + "; ".join(problems))


def _resolve(host: str, port: int | None = None) -> list[str]:
    """The addresses of `host`, each once, in the order the resolver prefers them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def connect_checked(
    host: str,
    port: int,
    timeout: float | None,
    policy: PullPolicy,
) -> socket.socket:
    """A socket to an address of `host` the policy allows: every address DNS gives is checked
    first, then one of those very addresses is connected to (no second lookup)."""
    addresses = _resolve(host, port)
    for address in addresses:
        check_address(host, address, policy)
    failure: OSError = OSError(f"{host} has no address")
    for address in addresses:
        try:  # an address literal: create_connection looks nothing up
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            failure = exc
    raise failure


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, *, policy: PullPolicy, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.policy = policy

    def connect(self) -> None:
        self.sock = connect_checked(self.host, self.port, self.timeout, self.policy)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(
        self, host: str, *, policy: PullPolicy, context: ssl.SSLContext, **kwargs: Any
    ) -> None:
        super().__init__(host, context=context, **kwargs)
        self.policy, self.tls = policy, context

    def connect(self) -> None:
        plain = connect_checked(self.host, self.port, self.timeout, self.policy)
        # The certificate is checked against the host name, not the address connected to.
        self.sock = self.tls.wrap_socket(plain, server_hostname=self.host)


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: PullPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
        return _CheckedHTTPConnection(host, policy=self.policy, **kwargs)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: PullPolicy) -> None:
        self.policy, self.tls = policy, ssl.create_default_context()
        super().__init__(context=self.tls)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPSConnection:
        return _CheckedHTTPSConnection(host, policy=self.policy, context=self.tls, **kwargs)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: PullPolicy) -> None:
        super().__init__()
        self.policy = policy

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        check_url(newurl, self.policy, redirected_from=req.full_url)
        fp.close()  # else urllib reads the redirect's whole body into memory, however long
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_checked(
    request: urllib.request.Request, policy: PullPolicy, timeout: float
) -> http.client.HTTPResponse:
    """urlopen, with every connection (redirects too) through the policy, and no proxy."""
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        _CheckedHTTPSHandler(policy),
        _CheckedRedirects(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ]
    if policy.allow_http:  # without it, no plain http connection can be made at all
        handlers.append(_CheckedHTTPHandler(policy))
    for handler in handlers:
        opener.add_handler(handler)
    return opener.open(request, timeout=timeout)


class PullTooLarge(PullError):
    """A file above the size cap: what was written of it is to be deleted."""


@dataclass(frozen=True)
class SizeCap:
    """The most bytes a pulled file may have, and where that limit comes from."""

    limit: int
    source: str

    @classmethod
    def for_pull(cls, policy: PullPolicy, models_dir: Path, held: int) -> SizeCap:
        """--pull-max-size, else the free disk of `models_dir` less the margin; `held`: bytes
        of the file already there (a .part), which the free space no longer counts."""
        if policy.max_bytes is not None:
            return cls(policy.max_bytes, "--pull-max-size")
        free = shutil.disk_usage(models_dir).free
        return cls(
            max(free + held - DISK_MARGIN_BYTES, 0),
            f"the free disk less {DISK_MARGIN_BYTES >> 30} GiB; --pull-max-size sets another",
        )

    def check(self, size: int, label: str, *, announced: bool) -> None:
        """Fail when `size` (announced, or received so far) is above the cap."""
        if size <= self.limit:
            return
        how = "is announced as" if announced else "has passed"
        raise PullTooLarge(
            f"{label} {how} {size:,} bytes, more than a pull may write "
            f"({self.limit:,} bytes: {self.source}); nothing of it is kept"
        )
