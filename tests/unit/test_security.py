"""Safe by default, on the scripted engine: what a web page the user opens can no longer do
(cross-site POSTs, DNS rebinding), keys and their scopes, the keys file, rate limits, and
stored responses private to their key. The real server is in
tests/integration/test_security.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.api_helpers import MODEL, ReadyTestClient, assert_error, chat, uvicorn_thread
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.api.keys import Keyring, KeysFileError, parse_keys_file
from vllm_obtain.api.rate_limits import Rate, RateLimiter, duration_text
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.response_store import ResponseStore
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.settings import Settings, rate_limit
from vllm_obtain.wiring import api_config

EVIL = "http://evil.example"


def app_with(settings: Settings, store: ResponseStore | None = None) -> Any:
    model = ServedModel(id=MODEL, engine=ScriptedEngine(), limits=ServingLimits())
    return create_app(api_config(settings), ModelRegistry([model]), response_store=store)


def client_with(settings: Settings | None = None, **options: Any) -> ReadyTestClient:
    app = app_with(settings or Settings())
    return ReadyTestClient(app, raise_server_exceptions=False, **options)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- cross-site requests ----------------------------------------------------------------------


def test_a_cross_site_text_plain_post_is_refused_and_the_model_stays_loaded():
    with client_with() as http:
        headers = {"Origin": EVIL, "Content-Type": "text/plain"}
        unload = http.post(f"/admin/models/{MODEL}/unload", content=b"{}", headers=headers)
        error = assert_error(unload, 403, None, "origin_not_allowed")
        assert EVIL in error["message"] and "--cors-origin" in error["message"]
        body = b'{"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}'
        assert http.post("/v1/chat/completions", content=body, headers=headers).status_code == 403
        listed = http.get("/admin/models").json()["data"]
        assert [m["state"] for m in listed] == ["loaded"]


def test_the_servers_own_page_and_allowed_origins_may_post_json():
    allowed = Settings(cors_origins=["https://app.example"])
    with client_with(allowed, base_url="http://127.0.0.1:8001") as http:
        own = {"Origin": "http://127.0.0.1:8001"}
        assert chat(http, headers=own).status_code == 200
        assert chat(http, headers={"Origin": "https://app.example"}).status_code == 200
        assert chat(http, headers={"Origin": "https://other.example"}).status_code == 403
        assert chat(http, headers={"Origin": "null"}).status_code == 403
        # Reading is no harm: the browser keeps the answer from a page CORS does not allow.
        assert http.get("/v1/models", headers={"Origin": EVIL}).status_code == 200


def test_a_page_on_another_port_of_the_same_host_is_another_site():
    with client_with(base_url="http://localhost") as http:  # Host: localhost, port 80
        assert chat(http, headers={"Origin": "http://localhost"}).status_code == 200
        refused = chat(http, headers={"Origin": "http://localhost:3000"})
        assert_error(refused, 403, None, "origin_not_allowed")


@pytest.mark.parametrize(
    "headers",
    [{"Host": "["}, {"Host": "a b"}, {"Host": "[name]"}, {"X-Forwarded-Host": "[::1"},
     {"Origin": "["}, {"Origin": "http://[::1"}, {"Origin": "http://a b"}],
)  # fmt: skip
def test_a_host_or_origin_that_is_no_name_is_refused_not_a_server_error(headers):
    with client_with() as http:
        response = chat(http, headers=headers)
        assert response.status_code == 403, response.text


def test_a_page_behind_a_proxy_is_same_origin_by_the_forwarded_host():
    with client_with(Settings(allowed_hosts=["llm.example"])) as http:
        headers = {"Origin": "https://llm.example", "X-Forwarded-Host": "llm.example"}
        assert chat(http, headers=headers).status_code == 200


def test_a_body_not_declared_json_is_read_as_json_only_without_an_origin():
    body = b'{"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}'
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl -d sends
    with client_with(base_url="http://127.0.0.1:8001") as http:
        assert http.post("/v1/chat/completions", content=body, headers=form).status_code == 200
        same_site = {**form, "Origin": "http://127.0.0.1:8001"}
        refused = http.post("/v1/chat/completions", content=body, headers=same_site)
        assert_error(refused, 415, None, "unsupported_media_type")
        vendor_json = {
            "Content-Type": "application/vnd.api+json",
            "Origin": "http://127.0.0.1:8001",
        }
        assert http.post("/v1/chat/completions", content=body, headers=vendor_json).is_success


# --- DNS rebinding: the Host check --------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8001", "localhost:8001", "[::1]:8001", "10.1.2.3", "vllm-obtain:8001",
     "box.local", "api.internal:8001"],
)  # fmt: skip
def test_ips_and_names_no_other_site_can_rebind_are_served(host):
    with client_with() as http:
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200


def test_a_foreign_host_name_is_refused_naming_the_flag_that_allows_it():
    with client_with() as http:
        refused = http.get("/v1/models", headers={"Host": "evil.example:8001"})
        error = assert_error(refused, 403, None, "host_not_allowed")
        assert "--allowed-host evil.example" in error["message"]
    with client_with(Settings(allowed_hosts=["api.example.com", "*.corp.example"])) as http:
        for host in ("api.example.com", "llm.corp.example:443"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200
        assert http.get("/v1/models", headers={"Host": "evil.example"}).status_code == 403
    with client_with(Settings(allowed_hosts=["*"])) as http:
        assert http.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200


def test_behind_a_proxy_that_sends_its_own_host_the_forwarded_name_is_checked():
    with client_with() as http:
        rebound = {"Host": "127.0.0.1:8001", "X-Forwarded-Host": "evil.example"}
        assert_error(http.get("/v1/models", headers=rebound), 403, None, "host_not_allowed")
    with client_with(Settings(allowed_hosts=["llm.example.com"])) as http:
        proxied = {"Host": "127.0.0.1:8001", "X-Forwarded-Host": "llm.example.com"}
        assert http.get("/v1/models", headers=proxied).status_code == 200


@pytest.mark.parametrize(
    "header", ["X-Forwarded-For", "X-Real-IP", "Forwarded", "X-Forwarded-Host"]
)
def test_a_proxy_on_this_machine_does_not_make_its_clients_local(header):
    """nginx on the same box reaches us from 127.0.0.1 for everyone: admin stays refused."""
    value = "for=203.0.113.9" if header == "Forwarded" else "203.0.113.9"
    with client_with() as http:
        refused = http.get("/admin/models", headers={header: value})
        assert_error(refused, 403, None, "admin_local_only")


# --- keys ---------------------------------------------------------------------------------


def test_a_keys_file_names_its_keys_and_marks_admins():
    keys = parse_keys_file("# teams\nteam-a: sk-a\n\nops: sk-ops admin  # on call\n", "keys")
    assert [(k.name, k.key, k.admin) for k in keys] == [
        ("team-a", "sk-a", False),
        ("ops", "sk-ops", True),
    ]
    for bad in ("sk-no-name", "a: sk-a root", "a:", ": sk-a"):
        with pytest.raises(KeysFileError, match="keys:1"):
            parse_keys_file(bad, "keys")
    # A '#' inside a key is the key's, not a comment that would cut it (and its admin mark).
    (inside,) = parse_keys_file("bob: abc#zzz admin", "keys")
    assert (inside.key, inside.admin) == ("abc#zzz", True)


def test_one_key_under_two_names_or_scopes_is_refused(tmp_path):
    with pytest.raises(KeysFileError, match="same key"):
        Keyring(["sk-same"], ["sk-same"])
    (tmp_path / "keys").write_text("a: sk-1\nb: sk-1 admin\n")
    with pytest.raises(KeysFileError, match="same key"):
        Keyring(keys_file=tmp_path / "keys")


def test_the_keys_file_is_reread_and_a_broken_one_keeps_the_keys_in_force(tmp_path):
    path = tmp_path / "keys"
    path.write_text("a: sk-a\n")
    keyring = Keyring(keys_file=path)
    assert keyring.lookup("sk-a") is not None and keyring.lookup("sk-b") is None
    path.write_text("b: sk-b admin\n")
    keyring.reload()
    assert keyring.lookup("sk-a") is None
    assert keyring.lookup("sk-b") is not None and keyring.has_admin
    path.write_text("b: sk-b\nb: sk-c\n")  # two keys of one name
    keyring.reload()
    assert keyring.lookup("sk-b") is not None and keyring.lookup("sk-c") is None


def test_an_empty_keys_file_shuts_every_door_rather_than_opening_them(tmp_path):
    (tmp_path / "keys").write_text("# nobody yet\n")
    with client_with(Settings(api_keys_file=tmp_path / "keys")) as http:
        assert_error(chat(http), 401, None, "invalid_api_key")


def test_the_key_name_labels_the_request_and_token_counters_never_the_key(tmp_path):
    (tmp_path / "keys").write_text("team-a: sk-team-a-secret\nops: sk-ops admin\n")
    settings = Settings(api_keys_file=tmp_path / "keys")
    with client_with(settings) as http:
        assert chat(http, headers=bearer("sk-team-a-secret")).status_code == 200
        text = http.get("/metrics").text
    assert 'key="team-a"' in text and "sk-team-a-secret" not in text
    generated = [line for line in text.splitlines() if "generation_tokens_total{" in line]
    assert any('key="team-a"' in line for line in generated), generated


# --- rate limits --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_bucket_refills_continuously_and_says_when_it_is_full_again():
    clock = Clock()
    limiter = RateLimiter(requests=Rate(*rate_limit("2/s")), tokens=None, clock=clock)
    assert limiter.admit("a") is None and limiter.admit("a") is None
    kind, wait = limiter.admit("a") or ("", 0.0)
    assert kind == "requests" and wait == pytest.approx(0.5)
    assert limiter.admit("b") is None  # every caller has its own allowance
    clock.now += 0.5
    assert limiter.admit("a") is None
    headers = limiter.headers("a")
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1s"


def test_tokens_are_charged_when_a_request_ends_and_hold_the_next_back_until_repaid():
    clock = Clock()
    limiter = RateLimiter(requests=None, tokens=Rate(600, 60), clock=clock)
    assert limiter.admit("a") is None
    limiter.charge_tokens("a", 1200)  # an answer may go past the allowance; then it is owed
    kind, wait = limiter.admit("a") or ("", 0.0)
    assert kind == "tokens" and wait == pytest.approx(60.1)
    clock.now += 61
    assert limiter.admit("a") is None


def test_reset_times_are_written_as_openai_writes_them():
    times = (0.02, 1.0, 1.5, 59.9999, 61, 119.7, 360)
    assert [duration_text(s) for s in times] == [
        "20ms", "1s", "1.5s", "1m0s", "1m1s", "2m0s", "6m0s",
    ]  # fmt: skip


def test_the_buckets_are_bounded_the_least_recently_used_forgotten(monkeypatch):
    monkeypatch.setattr("vllm_obtain.api.rate_limits.MAX_BUCKETS", 3)
    limiter = RateLimiter(requests=Rate(1, 60), tokens=None, clock=Clock())
    for who in ("a", "b", "c"):
        assert limiter.admit(who) is None
    assert limiter.admit("a") is not None  # used again: kept, and refused
    assert limiter.admit("d") is None  # "b", the least recently used, is forgotten
    assert len(limiter.buckets) == 3 and ("requests", "b") not in limiter.buckets


def test_an_ipv6_client_is_one_allowance_per_64_not_per_address():
    settings = Settings(rate_limit_requests="1/min")
    with client_with(settings, client=("2001:db8:1:2::1", 1)) as one:
        assert one.get("/v1/models").status_code == 200
    app_state = one.app
    with ReadyTestClient(app_state, client=("2001:db8:1:2::ffff", 1)) as same_64:
        assert same_64.get("/v1/models").status_code == 429


def test_past_the_limit_a_429_in_openais_shape_with_retry_after():
    settings = Settings(api_keys=["sk-a"], rate_limit_requests="2/min")
    with uvicorn_thread(app_with(settings), wait_ready=False) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-a", max_retries=0)
        first = client.with_raw_response.models.list()
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        client.models.list()
        with pytest.raises(openai.RateLimitError) as refused:
            client.models.list()
        headers = refused.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 30  # one request comes back every 30 s
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.value.code == "rate_limit_exceeded"
        assert "2 per minute" in refused.value.message


def test_without_keys_each_client_address_has_its_own_allowance():
    settings = Settings(rate_limit_requests="1/min")
    with client_with(settings, client=("10.0.0.1", 1)) as one:
        assert one.get("/v1/models").status_code == 200
        assert one.get("/v1/models").status_code == 429
        assert one.get("/health").status_code == 200  # only the API is limited


# --- stored responses belong to their key -------------------------------------------------


def test_a_stored_response_is_a_404_for_another_key_and_for_an_admin(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite3", max_age_seconds=3600, max_rows=100)
    settings = Settings(api_keys=["sk-a", "sk-b"], admin_keys=["sk-admin"])
    with ReadyTestClient(app_with(settings, store), raise_server_exceptions=False) as http:
        made = http.post(
            "/v1/responses", json={"model": MODEL, "input": "hi"}, headers=bearer("sk-a")
        )
        response_id = made.json()["id"]
        assert http.get(f"/v1/responses/{response_id}", headers=bearer("sk-a")).is_success
        for other in ("sk-b", "sk-admin"):
            path = f"/v1/responses/{response_id}"
            assert_error(http.get(path, headers=bearer(other)), 404, "response_id")
            assert_error(http.get(f"{path}/input_items", headers=bearer(other)), 404, "response_id")
            assert_error(http.delete(path, headers=bearer(other)), 404, "response_id")
            follow = {"model": MODEL, "input": "and?", "previous_response_id": response_id}
            refused = http.post("/v1/responses", json=follow, headers=bearer(other))
            assert_error(refused, 400, "previous_response_id", "previous_response_not_found")
        assert http.delete(f"/v1/responses/{response_id}", headers=bearer("sk-a")).is_success


def test_a_store_made_before_owners_keeps_its_rows_for_the_keyless_server(tmp_path):
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE responses (id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
            "document TEXT NOT NULL)"
        )
        document = '{"response": {"id": "resp_old"}, "input_items": [], "conversation": []}'
        db.execute("INSERT INTO responses VALUES ('resp_old', 9e12, ?)", (document,))
    db.close()
    store = ResponseStore(Path(path), max_age_seconds=1e13, max_rows=100)
    with ReadyTestClient(app_with(Settings(), store), raise_server_exceptions=False) as http:
        assert http.get("/v1/responses/resp_old").json() == {"id": "resp_old"}
