"""Production behaviour of the API layer, pinned on the scripted engine: keys, metrics, request
logs, the bounded queue, timeouts, limits, CORS and health probes. Crashes, hangs and shutdown of
a real engine are tested in tests/integration/test_faults.py."""

import asyncio
import dataclasses
import json
import threading
from typing import Any

import httpx
import openai
import pytest
from loguru import logger

from tests.api_helpers import (
    MODEL,
    ReadyTestClient,
    assert_error,
    chat,
    make_app,
    make_client,
    sse_events,
    uvicorn_thread,
)
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.api.health import overall_status
from vllm_obtain.api.keys import Keyring
from vllm_obtain.contract import ReplicaReport
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config

KEYS = Settings(api_keys=["sk-first", "sk-second"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- API keys ------------------------------------------------------------------------------


def test_key_matching_accepts_any_configured_key_only_and_names_it_without_the_key():
    keyring = Keyring(["a", "b"], ["c"])
    user, admin = keyring.lookup("b"), keyring.lookup("c")
    assert user is not None and not user.admin and user.name.startswith("key-")
    assert admin is not None and admin.admin and admin.name.startswith("admin-")
    assert keyring.lookup("d") is None
    assert keyring.lookup("") is None
    assert Keyring().lookup("a") is None
    assert Keyring().empty and not keyring.empty


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": "Basic sk-first"}])
def test_v1_routes_refuse_a_missing_or_wrong_key_with_401(headers):
    with make_client(ScriptedEngine(), KEYS) as client:
        for path in ("/v1/models", "/v1/chat/completions", "/v1/completions"):
            response = client.request(
                "GET" if path == "/v1/models" else "POST", path, headers=headers, json={}
            )
            error = assert_error(response, 401, None, "invalid_api_key")
            assert error["type"] == "invalid_request_error"
            assert response.headers["www-authenticate"] == "Bearer"


def test_each_configured_key_is_accepted():
    with make_client(ScriptedEngine(), KEYS) as client:
        for key in ("sk-first", "sk-second"):
            assert client.get("/v1/models", headers=bearer(key)).status_code == 200
            response = chat(client, headers=bearer(key))
            assert response.status_code == 200, response.text


def test_openai_sdk_raises_authentication_error_on_a_wrong_key():
    with uvicorn_thread(make_app(ScriptedEngine(), KEYS)) as base_url:
        sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
        sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-second", max_retries=0)
        assert [m.id for m in sdk.models.list()] == [MODEL]


def test_health_and_metrics_are_open_unless_configured_otherwise():
    with make_client(ScriptedEngine(), KEYS) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
    guarded = Settings(api_keys=["k"], admin_keys=["ka"], auth_health=True, auth_metrics=True)
    with make_client(ScriptedEngine(), guarded) as client:
        assert_error(client.get("/health"), 401, None, "invalid_api_key")
        assert_error(client.get("/health/ready"), 401, None, "invalid_api_key")
        assert client.get("/health", headers=bearer("k")).status_code == 200
        assert_error(client.get("/metrics"), 401, None, "invalid_api_key")
        # A protected /metrics tells every key's usage: an admin's to read.
        assert_error(client.get("/metrics", headers=bearer("k")), 403, None, "admin_key_required")
        assert client.get("/metrics", headers=bearer("ka")).status_code == 200


# --- metrics -------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_count_requests_tokens_and_latencies():
    with make_client(ScriptedEngine("abcde")) as client:
        answer = chat(client)
        assert answer.status_code == 200
        generated = answer.json()["usage"]["completion_tokens"]
        assert chat(client, stream=True).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "nope"}).status_code == 400
        text = client.get("/metrics").text
    route = "/v1/chat/completions"
    assert metric(text, "vllm_obtain_requests_total", route=route, status="200", model=MODEL) == 2
    assert metric(text, "vllm_obtain_requests_total", route=route, status="400") == 1
    assert metric(text, "vllm_obtain_generation_tokens_total", model=MODEL) == 2 * generated
    assert metric(text, "vllm_obtain_prompt_tokens_total", model=MODEL) > 0
    assert metric(text, "vllm_obtain_time_to_first_token_seconds_count", model=MODEL) == 2
    # One gap per token after each answer's first.
    gaps = metric(text, "vllm_obtain_inter_token_latency_seconds_count", model=MODEL)
    assert gaps == 2 * (generated - 1)
    duration_count = "vllm_obtain_request_duration_seconds_count"
    assert metric(text, duration_count, route=route, model=MODEL) == 2
    assert metric(text, "vllm_obtain_requests_in_flight", route=route) == 0
    assert metric(text, "vllm_obtain_engine_up", model=MODEL, engine="scripted") == 1
    assert metric(text, "vllm_obtain_engine_running_sequences", model=MODEL) == 0
    assert metric(text, "vllm_obtain_requests_queued", model=MODEL) == 0


# --- request logs --------------------------------------------------------------------------


@pytest.fixture
def log_records():
    records: list[Any] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    yield records
    logger.remove(sink)


def request_lines(records: list[dict]) -> list[dict]:
    return [r for r in records if r["function"] == "_log" and r["extra"].get("path")]


def test_one_log_line_per_request_with_id_model_tokens_latency_status(log_records):
    with make_client(ScriptedEngine("abc")) as client:
        response = chat(client, headers={"X-Request-ID": "req-42"})
        assert response.headers["x-request-id"] == "req-42"
    (line,) = [r for r in request_lines(log_records) if r["extra"]["path"].startswith("/v1")]
    extra = line["extra"]
    assert extra["request_id"] == "req-42"
    assert extra["model"] == MODEL
    assert extra["status"] == 200
    usage = response.json()["usage"]
    assert extra["completion_tokens"] == usage["completion_tokens"]
    assert extra["prompt_tokens"] == usage["prompt_tokens"]
    assert extra["latency_ms"] >= 0
    assert "prompt" not in extra


def test_prompt_text_is_logged_only_when_enabled(log_records):
    secret = "my card number is 4111"
    with make_client(ScriptedEngine()) as client:
        client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": secret}]},
        )
    assert not any(secret in json.dumps(r["extra"]) + r["message"] for r in log_records)
    with make_client(ScriptedEngine(), Settings(log_prompts=True)) as client:
        client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": secret}]},
        )
    assert any(secret in r["extra"].get("prompt", "") for r in request_lines(log_records))


# --- backpressure, timeouts, limits ---------------------------------------------------------


def test_past_running_plus_queue_requests_get_429_with_retry_after_and_later_succeed():
    engine = ScriptedEngine("x" * 40, max_running=1, delay=0.02)
    app = make_app(engine, limits=ServingLimits(max_queue=1))
    with uvicorn_thread(app) as base_url:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
                payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                return await asyncio.gather(
                    *(http.post("/v1/chat/completions", json=payload) for _ in range(5))
                )

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429]
        refused = next(r for r in responses if r.status_code == 429)
        assert_error(refused, 429, None, "queue_full")
        assert int(refused.headers["retry-after"]) >= 1
        assert httpx.post(f"{base_url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}]
        }, timeout=30).status_code == 200  # fmt: skip


def test_a_full_queue_refuses_a_stream_before_it_starts():
    engine = ScriptedEngine(endless=True, max_running=1)
    app = make_app(engine, limits=ServingLimits(max_queue=0))
    with uvicorn_thread(app) as base_url:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload) as first:
            lines = first.iter_lines()  # held: dropping it would close the first stream
            next(lines)
            second = httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=10)
            assert_error(second, 429, None, "queue_full")


def test_request_timeout_is_504_and_stops_the_generation():
    engine = ScriptedEngine(endless=True)
    with make_client(engine, limits=ServingLimits(request_timeout=0.3)) as client:
        assert_error(chat(client), 504, None, "timeout")
        streamed = chat(client, stream=True)
        assert streamed.status_code == 200
        assert sse_events(streamed)[-1]["error"]["code"] == "timeout"
    assert engine.running == 0
    assert engine.cancelled == 2


def test_oversized_body_is_413_by_length_or_by_counting():
    settings = Settings(max_body_mb=1 / 1024)  # 1 KiB
    with make_client(ScriptedEngine(), settings) as client:
        big = "x" * 2000
        assert_error(chat(client, messages=[{"role": "user", "content": big}]), 413, None)

        def chunked():
            yield json.dumps({"model": MODEL, "messages": []}).encode()[:10]
            yield b" " * 2000

        response = client.post("/v1/chat/completions", content=chunked())
        assert_error(response, 413, None, "request_too_large")
        assert chat(client).status_code == 200


def test_prompt_and_max_tokens_caps_are_400_naming_the_param():
    engine = ScriptedEngine()
    limits = ServingLimits(max_prompt_tokens=20, max_tokens=8)
    with make_client(engine, limits=limits) as client:
        long_prompt = [{"role": "user", "content": "y" * 50}]
        assert_error(chat(client, messages=long_prompt), 400, "messages", "prompt_too_long")
        assert_error(chat(client, max_tokens=9), 400, "max_tokens", "max_tokens_exceeded")
        assert chat(client, max_tokens=8).status_code == 200
        assert chat(client).status_code == 200
    assert engine.requests[-1].max_tokens == 8  # unset max_tokens gets the cap


# --- CORS ----------------------------------------------------------------------------------


def test_cors_preflight_answered_for_allowed_origins_without_a_key():
    settings = Settings(cors_origins=["https://app.example"], api_keys=["k"])
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with make_client(ScriptedEngine(), settings) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_by_default():
    with make_client(ScriptedEngine()) as client:
        response = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers


# --- health --------------------------------------------------------------------------------


def test_overall_status_from_model_states():
    assert overall_status(["ready"]) == "ok"
    assert overall_status(["loading"]) == "loading"
    assert overall_status(["restarting"]) == "degraded"
    assert overall_status(["ready", "restarting"]) == "degraded"
    assert overall_status(["failed"]) == "degraded"


@pytest.mark.parametrize(
    ("state", "health", "live", "ready"),
    [
        ("ready", (200, "ok"), 200, 200),
        ("restarting", (503, "degraded"), 200, 503),
        ("failed", (503, "degraded"), 503, 503),
    ],
)
def test_health_liveness_and_readiness_follow_the_engine_state(state, health, live, ready):
    engine = ScriptedEngine()
    with make_client(engine) as client:
        engine.state = state
        response = client.get("/health")
        assert (response.status_code, response.json()["status"]) == health
        assert response.json()["models"][0]["state"] == state
        assert client.get("/health/live").status_code == live
        assert client.get("/health/ready").status_code == ready


def test_health_is_loading_before_the_model_is_up():
    engine = ScriptedEngine()
    started, release = threading.Event(), threading.Event()
    original_load = engine.load

    async def slow_load():
        started.set()
        await asyncio.to_thread(release.wait)
        return await original_load()

    engine.load = slow_load  # type: ignore[method-assign]
    with uvicorn_thread(make_app(engine), wait_ready=False) as base_url:
        assert started.wait(10)
        response = httpx.get(f"{base_url}/health")
        assert (response.status_code, response.json()["status"]) == (503, "loading")
        assert httpx.get(f"{base_url}/health/ready").status_code == 503
        assert httpx.get(f"{base_url}/health/live").status_code == 200
        release.set()


def test_uvicorn_does_not_trace_every_message_below_debug_level(tmp_path):
    """At its TRACE level uvicorn wraps the app in a middleware that logs every ASGI message:
    work on every SSE chunk of every stream, then thrown away by our own level."""
    import logging

    import uvicorn
    from uvicorn.middleware.message_logger import MessageLoggerMiddleware

    from vllm_obtain.logs import configure_logging

    try:
        configure_logging(level="INFO", json_lines=False, logs_dir=None)
        config = uvicorn.Config(lambda scope, receive, send: None, log_config=None)
        config.load()
        assert not isinstance(config.loaded_app, MessageLoggerMiddleware)
        assert logging.getLogger("uvicorn.error").getEffectiveLevel() == logging.INFO
    finally:
        logger.remove()
        logger.add(lambda _: None)


# --- a model served by several replicas (on a cluster) ----------------------------------------


class ReplicatedScripted(ScriptedEngine):
    """The scripted engine as a deployment of two replicas, one of them restarting."""

    def replicas(self) -> list[ReplicaReport]:
        return [
            ReplicaReport("r1", "node-a", "ready", {"running": 2, "requests": 5}),
            ReplicaReport("r2", "node-b", "restarting", {"running": 0, "requests": 1}),
        ]


def test_health_lists_every_replica_of_a_replicated_model():
    with make_client(ReplicatedScripted()) as client:
        (model,) = client.get("/health").json()["models"]
    assert [(r["id"], r["node"], r["state"], r["requests"]) for r in model["replicas"]] == [
        ("r1", "node-a", "ready", 5),
        ("r2", "node-b", "restarting", 1),
    ]


def test_metrics_label_each_replica_of_a_replicated_model():
    with make_client(ReplicatedScripted()) as client:
        text = client.get("/metrics").text
    assert f'vllm_obtain_replica_up{{model="{MODEL}",node="node-a",replica="r1"}} 1.0' in text
    assert f'vllm_obtain_replica_up{{model="{MODEL}",node="node-b",replica="r2"}} 0.0' in text
    assert (
        f'vllm_obtain_replica_requests_total{{model="{MODEL}",node="node-a",replica="r1"}} 5.0'
        in text
    )
    with make_client(ScriptedEngine()) as client:  # one engine: no replica series
        assert 'replica="' not in client.get("/metrics").text


def test_behind_ray_serves_proxy_the_request_id_header_is_left_to_it():
    """Serve's proxy sets X-Request-ID (from the request's, as we would): a second one from us
    would give clients two."""
    settings_config = dataclasses.replace(api_config(Settings()), request_id_header=False)
    app = create_app(
        settings_config, ModelRegistry([ServedModel(id=MODEL, engine=ScriptedEngine())])
    )
    with ReadyTestClient(app) as client:
        response = chat(client, headers={"X-Request-ID": "mine"})
        assert response.status_code == 200
        assert "x-request-id" not in response.headers
    with make_client(ScriptedEngine()) as client:
        assert chat(client, headers={"X-Request-ID": "mine"}).headers["x-request-id"] == "mine"
