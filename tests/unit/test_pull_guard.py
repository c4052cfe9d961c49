"""The guard of pulls by URL (a client of /admin/pull picks the URL): https only unless allowed,
no loopback, private or link-local address unless its host is allowed (redirects and a DNS
answer that changes after the check included), and a size cap, before and while downloading.
A plain-http server on 127.0.0.1 plays every part; no test leaves this machine."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from vllm_obtain.cli import build_parser
from vllm_obtain.cli_flags import settings_from
from vllm_obtain.settings import Settings
from vllm_obtain.weights import pull_guard, pull_url
from vllm_obtain.weights.pull import PullError, PullPolicy, pull
from vllm_obtain.weights.pull_guard import DISK_MARGIN_BYTES, refused_kind
from vllm_obtain.wiring import model_puller

BODY = b"GGUF" + bytes(range(256)) * 40  # 10 KiB: the guard does not read what it fetches


@dataclass
class Web:
    """A plain-http server on 127.0.0.1: /m.gguf (its Content-Length true), /chunked.gguf
    (chunked, with `chunked_claim` as a Content-Length that chunking overrides),
    /redirect/m.gguf (a 302 to `location`); `paths` is what it was asked for."""

    port: int = 0
    location: str = ""
    chunked_claim: int | None = None
    paths: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def web() -> Iterator[Web]:
    state = Web()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked bodies need it

        def do_GET(self) -> None:
            state.paths.append(self.path)
            if self.path == "/redirect/m.gguf":
                self.send_response(302)
                self.send_header("Location", state.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/chunked.gguf":
                self._chunked(BODY * 4)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

        def _chunked(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            if state.chunked_claim is not None:
                self.send_header("Content-Length", str(state.chunked_claim))
            self.end_headers()
            for start in range(0, len(body), 4096):
                piece = body[start : start + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def pull_into(tmp_path: Path, url: str, policy: PullPolicy) -> Path:
    return pull(
        url, models_dir=tmp_path / "models", cache_dir=tmp_path / "cache", policy=policy
    ).path


def hosts(*names: str) -> frozenset[str]:
    return frozenset(names)


# --- https only ---------------------------------------------------------------------------------


def test_plain_http_is_refused_without_pull_allow_http_and_nothing_is_asked(tmp_path, web):
    with pytest.raises(PullError, match="--pull-allow-http") as refused:
        pull_into(tmp_path, web.url("/m.gguf"), PullPolicy(allow_hosts=hosts("127.0.0.1")))
    assert "--pull-allow-host" not in str(refused.value)  # the host itself is allowed
    assert web.paths == []


def test_the_default_policy_names_every_flag_a_local_http_url_needs(tmp_path, web):
    with pytest.raises(PullError) as refused:
        pull_into(tmp_path, web.url("/m.gguf"), PullPolicy())
    message = str(refused.value)
    assert "--pull-allow-http" in message and "--pull-allow-host 127.0.0.1" in message
    assert web.paths == []


# --- addresses ----------------------------------------------------------------------------------


def test_a_loopback_url_is_refused_unless_its_host_is_allowed(tmp_path, web):
    with pytest.raises(PullError) as refused:
        pull_into(tmp_path, web.url("/m.gguf"), PullPolicy(allow_http=True))
    assert "127.0.0.1 is a loopback address" in str(refused.value)
    assert "--pull-allow-host 127.0.0.1" in str(refused.value)
    assert web.paths == []
    allowed = PullPolicy(allow_http=True, allow_hosts=hosts("127.0.0.1"))
    assert pull_into(tmp_path, web.url("/m.gguf"), allowed).read_bytes() == BODY


def test_a_host_name_is_allowed_by_its_own_name(tmp_path, web):
    allowed = PullPolicy(allow_http=True, allow_hosts=hosts("LOCALHOST"))
    assert pull_into(tmp_path, web.url("/m.gguf", "localhost"), allowed).read_bytes() == BODY


@pytest.mark.parametrize("target", ["127.0.0.1:{port}", "169.254.169.254"])
def test_a_redirect_from_an_allowed_host_to_an_internal_address_is_refused(tmp_path, web, target):
    web.location = f"http://{target.format(port=web.port)}/m.gguf"
    allowed = PullPolicy(allow_http=True, allow_hosts=hosts("localhost"))
    with pytest.raises(PullError) as refused:
        pull_into(tmp_path, web.url("/redirect/m.gguf", "localhost"), allowed)
    address = target.partition(":")[0]
    message = str(refused.value)
    assert f"redirected from {web.url('/redirect/m.gguf', 'localhost')}" in message
    assert f"--pull-allow-host {address}" in message
    assert web.paths == ["/redirect/m.gguf"]  # the target was never asked
    assert not (tmp_path / "models" / "m.gguf").exists()


def test_a_redirect_to_an_allowed_host_is_followed(tmp_path, web):
    web.location = web.url("/m.gguf")
    allowed = PullPolicy(allow_http=True, allow_hosts=hosts("localhost", "127.0.0.1"))
    assert (
        pull_into(tmp_path, web.url("/redirect/m.gguf", "localhost"), allowed).read_bytes() == BODY
    )
    assert web.paths == ["/redirect/m.gguf", "/m.gguf"]


def test_a_redirect_to_plain_http_is_refused_without_pull_allow_http(tmp_path, web):
    web.location = web.url("/m.gguf")
    policy = PullPolicy(allow_hosts=hosts("127.0.0.1"))
    # No https server here to send the 302: the check the redirect handler makes, made directly.
    with pytest.raises(PullError, match=r"redirected from https://.*--pull-allow-http"):
        pull_guard.check_url(web.location, policy, redirected_from="https://example.org/m.gguf")
    assert web.paths == []


def test_a_dns_answer_that_changes_after_the_check_is_caught_at_the_connect(
    tmp_path, web, monkeypatch
):
    answers = iter(["93.184.215.14", "127.0.0.1"])  # public when checked, loopback at connect
    real = socket.getaddrinfo

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(PullError, match=r"rebind\.example resolves to 127\.0\.0\.1, a loopback"):
        pull_into(tmp_path, web.url("/m.gguf", "rebind.example"), PullPolicy(allow_http=True))
    assert web.paths == []


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4 inside IPv6
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 to 169.254.169.254
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of 169.254.169.254
        ("93.184.215.14", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_which_addresses_a_pull_may_not_reach(address, kind):
    assert refused_kind(address) == kind


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` (and its key), which a client trusts through SSL_CERT_FILE."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("certified", ["localhost", "other.example"])
def test_https_is_verified_against_the_host_name_not_the_address_connected_to(
    tmp_path, monkeypatch, certified
):
    cert, key = self_signed(tmp_path, certified)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by ssl.create_default_context
    monkeypatch.setattr(pull_url, "RETRY_DELAY_S", 0.01)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"https://localhost:{server.server_address[1]}/m.gguf"
    try:
        policy = PullPolicy(allow_hosts=hosts("localhost"))
        if certified == "localhost":
            assert pull_into(tmp_path, url, policy).read_bytes() == BODY
        else:
            with pytest.raises(PullError, match="certificate verify failed"):
                pull_into(tmp_path, url, policy)
    finally:
        server.shutdown()
        server.server_close()


# --- size ---------------------------------------------------------------------------------------


def local(max_bytes: int | None = None) -> PullPolicy:
    return PullPolicy(allow_http=True, allow_hosts=hosts("127.0.0.1"), max_bytes=max_bytes)


def test_a_file_announced_above_the_cap_is_refused_before_its_body(tmp_path, web):
    with pytest.raises(PullError, match="announced as 10,244 bytes") as refused:
        pull_into(tmp_path, web.url("/m.gguf"), local(max_bytes=10_000))
    assert "(10,000 bytes: --pull-max-size)" in str(refused.value)
    assert list((tmp_path / "models").iterdir()) == []  # no file, no .partial/


@pytest.mark.parametrize("claim", [None, 100], ids=["unannounced", "announced-short"])
def test_a_chunked_body_longer_than_the_cap_is_cut_and_deleted(tmp_path, web, claim):
    web.chunked_claim = claim  # chunked: a Content-Length beside it means nothing
    with pytest.raises(PullError, match=r"has passed \d[\d,]* bytes.*--pull-max-size"):
        pull_into(tmp_path, web.url("/chunked.gguf"), local(max_bytes=len(BODY)))
    assert list((tmp_path / "models").iterdir()) == []
    assert pull_into(tmp_path, web.url("/chunked.gguf"), local()).read_bytes() == BODY * 4


def test_without_a_cap_the_free_disk_less_a_margin_is_the_cap(tmp_path, web, monkeypatch):
    free = DISK_MARGIN_BYTES + 5000
    monkeypatch.setattr(pull_guard.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(PullError, match="5,000 bytes: the free disk less 1 GiB"):
        pull_into(tmp_path, web.url("/m.gguf"), local())


# --- settings and wiring ------------------------------------------------------------------------


def test_a_pull_max_size_that_is_not_a_size_is_refused_when_settings_load():
    with pytest.raises(ValidationError, match="not a size"):
        Settings(pull_max_size="lots")
    with pytest.raises(ValidationError, match="not a size"):
        Settings(pull_max_size="50%")
    assert Settings(pull_max_size="20GiB").pull_max_bytes == 20 << 30
    assert Settings().pull_max_bytes is None


def test_the_pull_command_takes_the_servers_pull_flags():
    args = build_parser().parse_args(
        ["pull", "--pull-allow-http", "--pull-allow-host", "a.lan", "--pull-allow-host",
         "10.0.0.5", "--pull-max-size", "2GiB", "http://a.lan/m.gguf"]
    )  # fmt: skip
    settings = settings_from(args)
    assert settings.pull_allow_http and settings.pull_allow_hosts == ["a.lan", "10.0.0.5"]
    assert settings.pull_max_bytes == 2 << 30


def test_the_servers_puller_is_guarded_by_its_settings(tmp_path, web):
    folders = {"models_dir": tmp_path / "models", "cache_dir": tmp_path / "cache"}
    with pytest.raises(PullError, match=r"--pull-allow-host 127\.0\.0\.1"):
        model_puller(Settings(**folders))(web.url("/m.gguf"), None, lambda progress: None)
    open_server = Settings(**folders, pull_allow_http=True, pull_allow_hosts=["127.0.0.1"])
    assert model_puller(open_server)(web.url("/m.gguf"), None, lambda progress: None) == "m"
