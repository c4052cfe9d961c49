"""`vllm-obtain serve --ray` on a real local Ray Serve, started by the server and stopped with
it: two engine replicas of the embedded model on llama.cpp (one thread, four slots each),
behind the ingress and Serve's HTTP proxy. Routing, streaming, observability, then faults:
a replica SIGKILLed under load, an engine that gives up, and the server's SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import AsyncOpenAI

from tests.integration.conftest import MODEL, RunningServer, free_port, running_server, wait_for

pytest.importorskip("ray.serve", reason="Ray Serve not installed: ./install.sh --ray")
pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed: ./install.sh")

SLOTS = 4  # per replica: Serve sends a replica no more requests than this at once
QUEUE = 16  # requests that may wait for a replica beyond those two replicas run
LONG_SYSTEM = "You are a careful assistant who answers briefly and precisely. " * 12


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("ray-server")
    args = [
        "--ray", "--replicas", "2", "--engine", "llama.cpp", "--threads", "1",
        "--parallel", str(SLOTS), "--embedding-model", "none",
        # An engine that crashes is not restarted in its replica: Ray replaces the replica.
        "--engine-max-restarts", "0", "--shutdown-timeout", "10",
        "--max-queue", str(QUEUE),
    ]  # fmt: skip
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # the server sets it too; this is the test's word
    # 4096 open files, hard: a CI runner's limit, under which HAProxy would not start unless
    # asked for fewer connections than Serve's default.
    with running_server(workdir, args, free_port(), open_files=4096) as server:
        wait_for(lambda: len(ready_replicas(server.url)) == 2, 60, "two ready replicas")
        yield server


def replicas(url: str) -> list[dict[str, Any]]:
    models = httpx.get(f"{url}/health", timeout=10).json()["models"]
    found: list[dict[str, Any]] = models[0].get("replicas", []) if models else []
    return found


def ready_replicas(url: str) -> list[dict[str, Any]]:
    return [r for r in replicas(url) if r["state"] == "ready"]


def served_counts(url: str) -> dict[str, int]:
    """Generations each replica has started, as it last reported (every second)."""
    return {r["id"]: int(r["requests"]) for r in replicas(url)}


def settled_counts(url: str) -> dict[str, int]:
    """The counts once the requests before have all been reported (two reports alike)."""
    last = served_counts(url)
    for _ in range(20):
        time.sleep(1.2)
        now = served_counts(url)
        if now == last:
            return now
        last = now
    return last


def wait_for_counts(url: str, before: dict[str, int], total: int) -> dict[str, int]:
    """The replicas' new requests since `before`, once they add up to `total`."""
    grown: dict[str, int] = {}

    def counted() -> bool:
        now = served_counts(url)
        grown.clear()
        grown.update({k: v - before.get(k, 0) for k, v in now.items() if v > before.get(k, 0)})
        return sum(grown.values()) >= total

    wait_for(counted, 20, f"{total} requests in the replicas' reports")
    return grown


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat read to its end: its content events, error event, and [DONE]."""
    seen: dict[str, Any] = {
        "status": None,
        "content": 0,
        "error": None,
        "done": False,
        "finish_reason": None,
    }
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        seen["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                seen["done"] = True
            elif "error" in (event := json.loads(data)):
                seen["error"] = event["error"]
            elif event["choices"]:
                choice = event["choices"][0]
                seen["content"] += bool(choice["delta"].get("content"))
                seen["finish_reason"] = choice["finish_reason"] or seen["finish_reason"]
    return seen


# --- routing and streaming -------------------------------------------------------------------


def test_twenty_concurrent_sdk_chats_all_succeed_and_reach_both_replicas(ray_server):
    url = ray_server.url
    before = settled_counts(url)

    async def chats() -> list[Any]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        asks = [
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Say a word about the number {i}."}],
                max_tokens=16,
            )
            for i in range(20)
        ]
        return await asyncio.gather(*asks)

    answers = asyncio.run(chats())
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert all(a.choices[0].message.content for a in answers)
    grown = wait_for_counts(url, before, 20)
    assert len(grown) == 2, f"not both replicas served: {grown}"


def test_a_stream_through_the_proxy_comes_token_by_token_and_ends_with_done(ray_server):
    body = chat_body("Count slowly.", stream=True, max_tokens=24, ignore_eos=True)
    arrivals: list[float] = []
    lines: list[str] = []
    with httpx.stream("POST", f"{ray_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter())
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    contents = [json.loads(line[6:]) for line in lines[1:-2]]  # after the role, before the end
    # Token by token: an event for (nearly) every token, arriving spread over the generation,
    # not in one burst (a token whose text is not whole yet travels with the next).
    assert len(contents) >= 16 and all(c["choices"][0]["delta"]["content"] for c in contents)
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:-2])]
    assert sum(gap > 0.002 for gap in gaps) >= len(gaps) // 2


def test_the_same_prefix_keeps_going_to_one_replica_and_spills_over_when_it_is_full(ray_server):
    url = ray_server.url

    def with_system(question: str, **extra: Any) -> dict[str, Any]:
        messages = [
            {"role": "system", "content": LONG_SYSTEM},
            {"role": "user", "content": question},
        ]
        return {"model": MODEL, "messages": messages, **extra}

    before = settled_counts(url)
    for i in range(5):
        body = with_system(f"Question {i}?", max_tokens=4)
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    grown = wait_for_counts(url, before, 5)
    # All five on one replica. One more may show, on either replica: an earlier test's
    # request reported late (issue 31: exact counts per request are still to come).
    holder = max(grown, key=grown.__getitem__)
    assert grown[holder] >= 5 and sum(grown.values()) <= 6, f"one prefix, several replicas: {grown}"

    before = settled_counts(url)

    async def at_once() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [
                with_system(f"Tell me about {i}.", max_tokens=48, ignore_eos=True, stream=True)
                for i in range(2 * SLOTS)
            ]
            return await asyncio.gather(*(stream_chat(client, url, b) for b in bodies))

    assert all(seen["done"] and seen["error"] is None for seen in asyncio.run(at_once()))
    grown = wait_for_counts(url, before, 2 * SLOTS)
    assert len(grown) == 2, f"a full replica did not spill over: {grown}"
    # (Tokenizing takes a replica's place for a moment too: the holder may have had fewer.)
    assert grown[holder] >= SLOTS // 2


def test_health_and_metrics_cover_every_replica_and_a_response_has_one_request_id(ray_server):
    url = ray_server.url
    ready = ready_replicas(url)
    assert len(ready) == 2 and all(r["node"] and r["pid"] for r in ready)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for replica in ready:
        assert f'replica="{replica["id"]}"' in metrics
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json=chat_body("Hi", max_tokens=2),
        headers={"X-Request-ID": "trace-me"},
        timeout=60,
    )
    assert response.headers.get_list("x-request-id") == ["trace-me"]
    unnamed = httpx.post(f"{url}/v1/chat/completions", json=chat_body("Hi", max_tokens=2))
    assert len(unnamed.headers.get_list("x-request-id")) == 1


def test_past_both_replicas_and_the_queue_requests_get_429_and_the_rest_succeed(ray_server):
    url = ray_server.url
    asked = 2 * SLOTS + QUEUE + 8

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as client:
            bodies = [chat_body(f"Story {i}", max_tokens=32, ignore_eos=True) for i in range(asked)]
            posts = [client.post(f"{url}/v1/chat/completions", json=b) for b in bodies]
            return await asyncio.gather(*posts)

    answers = asyncio.run(flood())
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 2 * SLOTS + QUEUE - 2  # a few may still be tokenizing
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"]


# --- faults ----------------------------------------------------------------------------------


def gone(process: int | psutil.Process) -> bool:
    """Exited (a zombie left for its reaper counts: it runs nothing)."""
    try:
        if isinstance(process, int):
            process = psutil.Process(process)
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_replica_killed_under_load_loses_only_its_streams_and_is_replaced(ray_server):
    url = ray_server.url
    victim = ready_replicas(url)[0]

    async def under_load() -> tuple[list[dict[str, Any]], list[int], float]:
        async with httpx.AsyncClient(timeout=180) as client:
            streams = [
                asyncio.create_task(
                    stream_chat(
                        client,
                        url,
                        chat_body(f"Story {i}", stream=True, max_tokens=96, ignore_eos=True),
                    )
                )
                for i in range(2 * SLOTS)
            ]
            await asyncio.sleep(1.0)  # both replicas full: what comes now waits at the router
            waiting = [
                asyncio.create_task(
                    client.post(f"{url}/v1/chat/completions", json=chat_body(f"Q{i}", max_tokens=8))
                )
                for i in range(SLOTS)
            ]
            await asyncio.sleep(0.5)
            os.kill(int(victim["replica_pid"]), signal.SIGKILL)
            killed_at = time.monotonic()
            seen = await asyncio.gather(*streams)
            statuses = [(await w).status_code for w in waiting]
            return seen, statuses, killed_at

    seen, statuses, killed_at = asyncio.run(under_load())
    assert statuses == [200] * SLOTS, "requests not yet streaming must succeed elsewhere"
    for stream in seen:
        assert stream["status"] == 200 and stream["done"], stream
        if stream["error"] is not None:  # it was on the victim: it ends with an error event
            assert stream["content"] > 0 and stream["error"]["type"], stream
    assert any(s["error"] is None and s["finish_reason"] == "length" for s in seen)
    assert any(s["error"] is not None for s in seen), "the killed replica had no stream"

    def replaced() -> bool:
        ready = ready_replicas(url)
        return len(ready) == 2 and victim["id"] not in {r["id"] for r in ready}

    wait_for(replaced, max(1.0, 30 - (time.monotonic() - killed_at)), "a replacement within 30 s")
    answer = httpx.post(
        f"{url}/v1/chat/completions", json=chat_body("Hi", max_tokens=4), timeout=60
    )
    assert answer.status_code == 200
    time.sleep(max(0.0, 10 - (time.monotonic() - killed_at)))
    assert gone(int(victim["pid"])), "the killed replica's engine process was left orphaned"


def test_a_replica_whose_engine_gives_up_fails_its_health_check_and_is_replaced(ray_server):
    url = ray_server.url
    victim = ready_replicas(url)[0]
    os.kill(int(victim["pid"]), signal.SIGKILL)  # its engine, never restarted here
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < 60:
        body = chat_body("Hi", max_tokens=4)
        statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)
        ids = {r["id"] for r in ready_replicas(url)}
        if len(ids) == 2 and victim["id"] not in ids:
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"the failed replica was not replaced: {replicas(url)}")
    assert set(statuses) == {200}, "requests meanwhile went to the healthy replica"


def test_sigterm_takes_down_every_ray_process_the_server_started(ray_server):
    """Last in this module: it stops the module's server."""
    started = psutil.Process(ray_server.process.pid).children(recursive=True)
    names = " ".join(p.name() for p in started)
    assert "raylet" in names and "gcs_server" in names
    ray_server.process.send_signal(signal.SIGTERM)
    ray_server.process.wait(timeout=90)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(gone(p) for p in started):
        time.sleep(0.25)
    left = [f"{p.pid} {p.name()}" for p in started if not gone(p)]
    assert not left, f"left running: {left}"
    log = Path(ray_server.log_path).read_text()
    assert "Ray is down" in log
