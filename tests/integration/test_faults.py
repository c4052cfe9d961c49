"""Fault injection on the real llama.cpp engine in its worker process: a segfault and a hang
mid-stream, an overloaded queue, a client that leaves, a reader that does not read, SIGTERM.

The server runs 2 slots and a queue of 1, and calls a busy engine hung after 3 s without
progress, so every fault shows quickly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    MODEL,
    free_port,
    running_server,
    start_server,
    wait_for,
)

FAULTY = ["--engine", "llama.cpp", "--parallel", "2", "--max-queue", "1", "--ctx-size", "4096"]
FAULTY += ["--engine-hang-timeout", "3"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    workdir: Path = tmp_path_factory.mktemp("faults")
    with start_server(workdir, FAULTY, free_port()) as base_url:
        yield base_url


def request_body(stream: bool = False, max_tokens: int = 1500, **extra: object) -> dict:
    """A long generation (ignore_eos) that is still running when the fault comes."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def engine_pid(url: str) -> int:
    return int(health(url)["models"][0]["pid"])


def wait_ready(url: str, timeout: float = 60) -> None:
    wait_for(
        lambda: httpx.get(f"{url}/health/ready", timeout=5).status_code == 200, timeout, "ready"
    )


def events(lines: Iterator[str]) -> Iterator[str]:
    """The payloads of an SSE stream's `data:` lines."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def rest_of_stream(data: Iterator[str]) -> list[str]:
    return list(data)


def assert_ends_with_engine_error(rest: list[str]) -> None:
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "engine_unavailable", error
    assert "restarting" in error["message"]


def assert_answers(url: str) -> None:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_engine_segfault_mid_stream_fails_in_flight_requests_cleanly_then_recovers(url):
    pid = engine_pid(url)
    with ThreadPoolExecutor(1) as pool:
        blocking = pool.submit(
            httpx.post, f"{url}/v1/chat/completions", json=request_body(), timeout=120
        )
        body = request_body(stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as stream:
            data = events(stream.iter_lines())
            for _ in range(3):
                next(data)
            wait_for(lambda: health(url)["models"][0]["running"] == 2, 10, "both running")
            os.kill(pid, signal.SIGSEGV)
            rest = rest_of_stream(data)
        assert_ends_with_engine_error(rest)
        refused = blocking.result()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "engine_unavailable"
    assert int(refused.headers["retry-after"]) >= 1

    wait_ready(url)
    assert engine_pid(url) != pid
    assert_answers(url)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'vllm_obtain_engine_restarts_total{engine="llama.cpp"' in metrics


def test_embedding_engine_crash_is_survived_and_it_restarts(url):
    wait_ready(url)  # the embedding model too
    pid = int(health(url)["embedding_models"][0]["pid"])
    body = {"model": "all-minilm-l6-v2", "input": ["first"], "encoding_format": "float"}
    assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).status_code == 200
    os.kill(pid, signal.SIGSEGV)
    wait_for(lambda: health(url)["embedding_models"][0]["state"] != "ready", 10, "noticed")
    meanwhile = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    # Refused while it restarts (or served, if the restart already finished): never a 500.
    assert meanwhile.status_code in (200, 503), meanwhile.text
    if meanwhile.status_code == 503:
        assert meanwhile.json()["error"]["code"] == "engine_unavailable"
    assert_answers(url)  # the chat model never noticed
    wait_ready(url)
    restarted = health(url)["embedding_models"][0]
    assert int(restarted["pid"]) != pid and restarted["restarts"] == 1
    again = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    assert again.status_code == 200 and len(again.json()["data"][0]["embedding"]) == 384


def test_hung_engine_is_killed_and_restarted(url):
    wait_ready(url)
    pid = engine_pid(url)
    body = request_body(stream=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as stream:
        data = events(stream.iter_lines())
        next(data)
        os.kill(pid, signal.SIGSTOP)  # alive but silent: what a deadlock in native code looks like
        stopped = time.monotonic()
        rest = rest_of_stream(data)
        detected_after = time.monotonic() - stopped
    assert_ends_with_engine_error(rest)
    assert detected_after < 3 + 10
    wait_ready(url)
    assert engine_pid(url) != pid
    assert_answers(url)


def test_overload_is_429_with_retry_after_and_the_admitted_finish(url):
    wait_ready(url)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            body = request_body(max_tokens=64)
            return await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(6))
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 429, 429, 429]  # 2 running + 1 queued
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"]
    for answered in (r for r in responses if r.status_code == 200):
        assert answered.json()["usage"]["completion_tokens"] == 64
    assert_answers(url)


def test_client_that_leaves_frees_its_slot(url):
    wait_ready(url)
    body = request_body(stream=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as stream:
        data = events(stream.iter_lines())
        for _ in range(3):
            next(data)
    wait_for(lambda: health(url)["models"][0]["running"] == 0, 10, "the slot to be freed")


def test_slow_reader_holds_back_nobody_and_still_gets_everything(url):
    wait_ready(url)
    body = request_body(stream=True, max_tokens=300)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as slow:
        lines = slow.iter_lines()
        first = next(lines)  # then it stops reading while others are served
        started = time.monotonic()
        for _ in range(3):
            assert_answers(url)
        others_took = time.monotonic() - started
        time.sleep(1)
        rest = list(events(lines))
    assert first.startswith("data: ")
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(r) for r in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(text) > 300  # 300 tokens of story
    assert others_took < 60


def test_sigterm_lets_streams_finish_refuses_new_work_and_exits(tmp_path: Path):
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    port = free_port()
    args = ["--engine", "llama.cpp", "--api-key", "sk-test", "--shutdown-timeout", "60"]
    with running_server(tmp_path, args, port) as server:
        headers = {"Authorization": "Bearer sk-test"}
        refused = httpx.get(f"{server.url}/v1/models")
        assert refused.status_code == 401
        engine = int(httpx.get(f"{server.url}/health").json()["models"][0]["pid"])
        body = request_body(stream=True, max_tokens=200)
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as stream:
            data = events(stream.iter_lines())
            next(data)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{server.url}/health", timeout=2)
            rest = list(data)
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        wait_for(lambda: not _alive(engine), 10, "the engine process to exit")
        log = server.log_path.read_text()
        assert "Application shutdown complete" in log
        assert "Fatal" not in log and "Traceback" not in log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent, which is gone too) is not alive.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
