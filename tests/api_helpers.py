"""Helpers for API-layer tests on the scripted engine: an app, requests, and what to expect."""

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config

MODEL = "scripted"


def make_app(
    engine: ScriptedEngine, settings: Settings | None = None, limits: ServingLimits | None = None
) -> Any:
    model = ServedModel(id=MODEL, engine=engine, limits=limits or ServingLimits())
    return create_app(api_config(settings or Settings()), registry=ModelRegistry([model]))


class ReadyTestClient(TestClient):
    """A TestClient that, on entering, waits until the models (loaded in the background) are up."""

    def __init__(self, app: Any, **options: Any) -> None:
        # A client on this machine, as the server's own user is (not TestClient's "testclient",
        # which is no address: /admin/* would take it for a stranger's).
        options.setdefault("client", ("127.0.0.1", 50000))
        super().__init__(app, **options)

    def __enter__(self) -> "ReadyTestClient":
        super().__enter__()
        keyring = cast(FastAPI, self.app).state.config.keyring
        key = keyring.first_key(admin=False) or keyring.first_key(admin=True)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.get("/health/ready", headers=headers).status_code == 200:
                break
            time.sleep(0.01)
        return self


def make_client(
    engine: ScriptedEngine, settings: Settings | None = None, limits: ServingLimits | None = None
) -> TestClient:
    return ReadyTestClient(make_app(engine, settings, limits), raise_server_exceptions=False)


def chat(client: TestClient, headers: dict[str, str] | None = None, **body):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post("/v1/chat/completions", json=payload, headers=headers)


def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def error_body(exc: Any) -> dict[str, Any]:
    """The OpenAI error object an SDK exception (openai.APIStatusError) carries."""
    body = exc.body
    assert isinstance(body, dict), body
    return body


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]
    return error


@contextlib.contextmanager
def uvicorn_thread(app, *, wait_ready: bool = True) -> Iterator[str]:
    """The app served over real HTTP on a thread; by default once its models are up."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while wait_ready and time.monotonic() < deadline:
        if httpx.get(f"{url}/health/ready").status_code == 200:
            break
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
