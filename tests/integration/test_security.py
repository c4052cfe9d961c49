"""Safe by default, on the real server: a web page the user opens cannot drive it (a
cross-site POST, DNS rebinding), keys have scopes and names, stored responses are private to
their key, and a client past its rate limit gets a 429 that the openai SDK's own retry
survives. The guarded pulls are in tests/integration/test_pull_guard.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, RunningServer, free_port, running_server, wait_for

EVIL_ORIGIN = "http://evil.example"
KEYS = "team-a: sk-team-a\nteam-b: sk-team-b\nburst: sk-burst\nops: sk-ops admin\n"
RATE = 20  # requests per minute per key: Retry-After is then 3 s


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the default set-up: no key, loopback ----------------------------------------------------


def test_a_cross_site_text_plain_post_is_refused_and_the_model_stays_loaded(base_url: str):
    headers = {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain"}
    unload = httpx.post(f"{base_url}/admin/models/{MODEL}/unload", content=b"{}", headers=headers)
    assert unload.status_code == 403, unload.text
    assert unload.json()["error"]["code"] == "origin_not_allowed"
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()
    chat = httpx.post(f"{base_url}/v1/chat/completions", content=body, headers=headers)
    assert chat.status_code == 403, chat.text
    states = {m["id"]: m["state"] for m in httpx.get(f"{base_url}/admin/models").json()["data"]}
    assert states[MODEL] == "loaded"
    # curl -d (form-urlencoded, no Origin) still works.
    plain = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=body.replace(b"}]}", b'}], "max_tokens": 4}'),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=120,
    )
    assert plain.status_code == 200, plain.text


def test_a_rebound_host_name_is_refused(base_url: str):
    refused = httpx.get(f"{base_url}/v1/models", headers={"Host": "evil.example:8001"})
    assert refused.status_code == 403, refused.text
    assert "--allowed-host evil.example" in refused.json()["error"]["message"]
    assert httpx.get(f"{base_url}/v1/models", headers={"Host": "localhost"}).status_code == 200


# --- a server with named keys and rate limits ---------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    workdir: Path = tmp_path_factory.mktemp("keyed")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(KEYS)
    args = ["--engine", "llama.cpp", "--api-keys-file", str(keys_file)]
    args += ["--rate-limit-requests", f"{RATE}/min", "--auth-metrics"]
    with running_server(workdir, args, free_port()) as server:
        yield server, keys_file


def sdk(server: RunningServer, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=retries)


def test_a_user_key_may_not_manage_the_server_an_admin_key_may(keyed):
    server, _ = keyed
    refused = httpx.get(f"{server.url}/admin/models", headers=bearer("sk-team-a"))
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "admin_key_required"
    listed = httpx.get(f"{server.url}/admin/models", headers=bearer("sk-ops"))
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_a_response_stored_with_one_key_is_a_404_for_another(keyed):
    server, _ = keyed
    made = sdk(server, "sk-team-a").responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=16
    )
    assert sdk(server, "sk-team-a").responses.retrieve(made.id).id == made.id
    for other in ("sk-team-b", "sk-ops"):
        with pytest.raises(openai.NotFoundError):
            sdk(server, other).responses.retrieve(made.id)
        with pytest.raises(openai.BadRequestError, match="not found"):
            sdk(server, other).responses.create(
                model=MODEL, input="And?", previous_response_id=made.id, max_output_tokens=16
            )


def test_past_the_request_limit_a_429_with_headers_and_the_sdk_retry_succeeds(keyed):
    server, _ = keyed
    hasty = sdk(server, "sk-burst")
    answered = 0
    with pytest.raises(openai.RateLimitError) as refused:
        # The allowance refills as the loop runs (one every 3 s): a few more may get through.
        while answered < 2 * RATE:
            hasty.models.list()
            answered += 1
    assert answered >= RATE
    headers = refused.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 3
    assert headers["x-ratelimit-limit-requests"] == str(RATE)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    # The SDK's own back-off reads Retry-After and gets through on its retry.
    patient = sdk(server, "sk-burst", retries=2).with_raw_response
    started = time.monotonic()
    answer = patient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.http_response.status_code == 200
    assert time.monotonic() - started >= 2.0  # it waited for the allowance, not hammered
    assert answer.headers["x-ratelimit-limit-requests"] == str(RATE)
    # Another key's allowance is its own.
    assert sdk(server, "sk-team-b").models.list().data


def test_usage_per_key_name_is_in_metrics_and_the_log_never_the_key(keyed):
    server, _ = keyed
    sdk(server, "sk-team-b").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert httpx.get(f"{server.url}/metrics", headers=bearer("sk-team-b")).status_code == 403
    text = httpx.get(f"{server.url}/metrics", headers=bearer("sk-ops")).text
    generated = [line for line in text.splitlines() if "generation_tokens_total{" in line]
    assert any('key="team-b"' in line for line in generated), generated
    log = (server.log_path.parent / "logs").glob("*.log")
    lines = "".join(path.read_text() for path in log)
    assert "team-b" in lines and "sk-team-b" not in lines


def test_the_keys_file_is_reread_on_sighup(keyed):
    server, keys_file = keyed
    assert httpx.get(f"{server.url}/v1/models", headers=bearer("sk-new")).status_code == 401
    keys_file.write_text(KEYS + "newcomer: sk-new\n")
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(
        lambda: httpx.get(f"{server.url}/v1/models", headers=bearer("sk-new")).status_code == 200,
        10,
        "the new key to be accepted after SIGHUP",
    )
    assert server.process.poll() is None  # reloaded, not stopped
