"""Soak with faults: one server under mixed load for a bounded time, engines and the server
killed on a schedule, every outcome explained, memory and open files flat.

    python benchmarks/soak.py --minutes 3 --json soak.json --plot soak.png   # the CI version
    python benchmarks/soak.py --minutes 60 --json ... --plot ...             # the hour

It starts its own `vllm-obtain serve` (llama.cpp): named keys with per-key rate limits, the
embedded model pinned and a second model (the same GGUF under another name) loaded on demand
with a short keep-alive, so it is loaded and unloaded again and again. Clients, one key per
group: chat and Responses, streamed and not, embeddings, stored Responses chains
(previous_response_id), tool calls, json_schema output; 5 % of streams are hung up mid-way, 1 %
of requests are hostile (bad JSON, a body over --max-body-mb, a foreign Origin or Host, wrong
or missing keys, a user key on /admin, another key's stored response; each kind once at the
start too), and one client runs into its rate limit on purpose. Every Retry-After (429, 503)
is honoured. At the end, one stored response's client hangs up as soon as it has its
response.completed event: it must be stored all the same.

Faults: an engine process (pinned model, embedding model, second model in turn) SIGKILLed every
--engine-kill-every minutes, and the whole server SIGKILLed once (--server-kill-at): then no
engine may outlive it, its responses store must pass `PRAGMA integrity_check` and hold every
response it had answered as stored, and it is started again with the same flags.

Criteria (the exit status is 1 if one fails; benchmarks/soak_report.py judges): no unexplained
outcome (a 5xx, a stream's error event or a cut connection only for requests overlapping a
fault on what they used; no hang: a request without a byte for --hang-timeout seconds); RSS and
open files within 5 % from the end of the warm-up to the end (medians of the windows between
faults: like with like); the store sound; no engine process left behind; the second model
swapped in and out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from soak_report import (
    GROWTH_LIMIT_PCT,
    HOSTILE_STATUS,
    Fault,
    Record,
    comparisons,
    markdown,
    plot,
    second_model_swaps,
    tally,
    tokens_per_second,
    windows,
)
from soak_server import (
    EMBEDDER,
    PINNED,
    SECOND,
    EngineProcess,
    Keys,
    ProcessId,
    Sample,
    Server,
    check_store,
    descendants,
    end_processes,
    engine_processes,
    is_running,
    measure,
    place_second_model,
    wait_gone,
    write_keys,
)

TOPICS = ["the sea", "a city at night", "bread", "trains", "winter", "a small robot", "tea"]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
ANIMAL = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "legs": {"type": "integer"}},
    "required": ["name", "legs"],
    "additionalProperties": False,
}
# Request kinds and their weights in a client's mix (hostile ones come on top, HOSTILE_SHARE).
MIX = {
    "chat": 18, "chat_stream": 20, "responses": 12, "responses_stream": 12, "chain": 10,
    "embeddings": 10, "tools": 9, "json_schema": 9,
}  # fmt: skip
HOSTILE_SHARE = 0.01
CANCEL_SHARE = 0.05  # of streams, hung up after a few events
AT_END = -1  # a stream hung up right after its last event (response.completed)
CHAIN_LENGTH = 4  # turns before a chain starts again (its prompt grows with each)
# The second model is asked for in phases of PHASE_S; after each, none ask for it until the
# server has unloaded it (--keep-alive after its last request) and GAP_S more have passed, so
# it is loaded and unloaded again and again however slow the requests are.
PHASE_S, GAP_S = 20.0, 5.0
SECOND_SHARE = 0.4  # of generation requests during a phase


@dataclass(frozen=True)
class Config:
    minutes: float
    concurrency: int
    users: int
    engine: str
    hang_timeout: float
    warmup_min: float
    engine_kill_every_min: float
    server_kill_at_min: float
    sample_every: float
    max_body_mb: float
    keep_alive: str
    rate_limit_requests: str
    rate_limit_tokens: str
    seed: int

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    def fault_plan(self) -> list[tuple[float, str]]:
        """(seconds from the start, "engine" or "server"): engine kills every so often, none
        in the last half interval (it must recover within the run) nor next to the server's."""
        plan = []
        if self.server_kill_at_min > 0:
            plan.append((self.server_kill_at_min * 60, "server"))
        every = self.engine_kill_every_min
        k = 1
        while every > 0 and k * every <= self.minutes - every / 2:
            if abs(k * every - self.server_kill_at_min) >= every / 4:
                plan.append((k * every * 60, "engine"))
            k += 1
        return sorted(fault for fault in plan if fault[0] < self.seconds)

    def serve_args(self, keys_file: Path) -> list[str]:
        """`serve` flags: keys and rate limits, the keep-alive that makes the second model
        swap, the body limit the hostile requests exceed, the SQLite store."""
        return [
            "--engine", self.engine, "--api-keys-file", str(keys_file),
            "--rate-limit-requests", self.rate_limit_requests,
            "--rate-limit-tokens", self.rate_limit_tokens,
            "--keep-alive", self.keep_alive, "--max-body-mb", str(self.max_body_mb),
            "--responses-store", "sqlite",
        ]  # fmt: skip


@dataclass
class Stored:
    """A response the server answered with `store: true`: who asked, and when it was done."""

    key: str
    at: float
    streamed: bool
    hung_up_at_end: bool = False


@dataclass
class Run:
    config: Config
    keys: Keys
    server: Server
    started: float = field(default_factory=time.monotonic)
    records: list[Record] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    stored: dict[str, Stored] = field(default_factory=dict)
    hostile_sent: int = 0
    second_wanted: bool = False  # a phase of requests for the second model is on
    clients_done: bool = False

    def now(self) -> float:
        return time.monotonic() - self.started

    def over(self) -> bool:
        return self.now() >= self.config.seconds

    def next_hostile(self) -> str:
        names = list(HOSTILE_STATUS)
        self.hostile_sent += 1
        return names[(self.hostile_sent - 1) % len(names)]


@dataclass
class Client:
    """One simulated user: its connection, its key, its random choices, its current chain."""

    run: Run
    http: httpx.AsyncClient
    rng: random.Random
    key_name: str
    key: str
    chain: str | None = None
    chain_turns: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def model(self) -> str:
        second = self.run.second_wanted and self.rng.random() < SECOND_SHARE
        return SECOND if second else PINNED

    def cancel_after(self) -> int | None:
        return self.rng.randint(2, 8) if self.rng.random() < CANCEL_SHARE else None


# --- answers -----------------------------------------------------------------------------------


def note_refusal(record: Record, response: httpx.Response) -> None:
    """A non-2xx: its status, its error code (OpenAI's envelope) and its Retry-After."""
    record.failure, record.status = "status", response.status_code
    with contextlib.suppress(ValueError):
        record.retry_after = float(response.headers.get("retry-after", ""))
    try:
        error = response.json()["error"]
        record.error = str(error.get("code") or error.get("type") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        record.error = response.text[:80]


def answered(record: Record, response: httpx.Response) -> bool:
    """Whether the answer is a 2xx (else the refusal is noted)."""
    record.status = response.status_code
    if response.is_success:
        return True
    note_refusal(record, response)
    return False


async def stream_answered(record: Record, response: httpx.Response) -> bool:
    """As `answered`, for a stream: a refusal's body is read first."""
    record.status = response.status_code
    if response.is_success:
        return True
    await response.aread()
    note_refusal(record, response)
    return False


async def sse_data(response: httpx.Response) -> AsyncIterator[Any]:
    """The payloads of a stream's `data:` lines: JSON objects, or "[DONE]"."""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


def error_code(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or error.get("message", ""))[:80]
    return str(error)[:80]


async def read_chat_stream(response: httpx.Response, record: Record, cancel: int | None) -> None:
    seen = 0
    async for event in sse_data(response):
        if event == "[DONE]":
            return
        if "error" in event:
            record.failure, record.error = "event", error_code(event["error"])
            continue
        if event.get("usage"):
            record.tokens = event["usage"]["completion_tokens"]
        seen += 1
        if seen == cancel:
            record.cancelled = True
            return
    if not record.failure:
        record.failure, record.error = "cut", "no [DONE]"


async def read_response_stream(
    response: httpx.Response, record: Record, cancel: int | None
) -> dict[str, Any] | None:
    """The finished response of a Responses stream, read to its end as the SDKs do (None if
    it failed or was hung up; with `cancel` AT_END, hung up as soon as it is finished)."""
    seen, finished = 0, None
    async for event in sse_data(response):
        kind = event.get("type")
        if kind in ("response.completed", "response.incomplete"):
            record.tokens = event["response"]["usage"]["output_tokens"]
            finished = event["response"]
            if cancel == AT_END:
                record.cancelled = True
                return finished
            continue
        if kind == "response.failed":
            record.failure = "event"
            record.error = error_code(event["response"].get("error") or "response.failed")
            return None
        if kind == "error" or (kind is None and "error" in event):
            record.failure, record.error = "event", error_code(event.get("error", event))
            return None
        seen += 1
        if seen == cancel:
            record.cancelled = True
            return None
    if finished is None:
        record.failure, record.error = "cut", "no response.completed"
    return finished


# --- requests ----------------------------------------------------------------------------------


def prompt(rng: random.Random) -> str:
    return f"Write about {rng.choice(TOPICS)}."


async def chat(client: Client, record: Record, stream: bool) -> None:
    body: dict[str, Any] = {
        "model": record.model,
        "messages": [{"role": "user", "content": prompt(client.rng)}],
        "max_tokens": client.rng.randint(16, 96),
        "temperature": 0.8,
    }
    if not stream:
        response = await client.http.post("/v1/chat/completions", json=body, headers=client.auth)
        if answered(record, response):
            record.tokens = response.json()["usage"]["completion_tokens"]
        return
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    path, auth = "/v1/chat/completions", client.auth
    async with client.http.stream("POST", path, json=body, headers=auth) as response:
        if await stream_answered(record, response):
            await read_chat_stream(response, record, client.cancel_after())


async def respond(
    client: Client, record: Record, stream: bool, previous: str | None, at_end: bool = False
) -> str | None:
    """A stored response (a chain's next turn when `previous` is given); `at_end`: a stream
    hung up as soon as its response.completed event is in. Its id, if it was stored."""
    body: dict[str, Any] = {
        "model": record.model,
        "input": prompt(client.rng) if previous is None else "And then? One sentence more.",
        "max_output_tokens": client.rng.randint(16, 64),
        "store": True,
        "stream": stream,
    }
    if previous is not None:
        body["previous_response_id"] = previous
    if not stream:
        response = await client.http.post("/v1/responses", json=body, headers=client.auth)
        if not answered(record, response):
            return None
        finished = response.json()
        record.tokens = finished["usage"]["output_tokens"]
        return note_stored(client, finished, streamed=False)
    async with client.http.stream("POST", "/v1/responses", json=body, headers=client.auth) as r:
        if not await stream_answered(record, r):
            return None
        done = await read_response_stream(r, record, AT_END if at_end else client.cancel_after())
    return None if done is None else note_stored(client, done, streamed=True, at_end=at_end)


def note_stored(
    client: Client, response: dict[str, Any], *, streamed: bool, at_end: bool = False
) -> str | None:
    """Remember a response the server says it stored; its id."""
    if not response.get("store") or response.get("status") not in ("completed", "incomplete"):
        return None
    client.run.stored[response["id"]] = Stored(client.key, client.run.now(), streamed, at_end)
    return str(response["id"])


async def stored_response(
    client: Client, record: Record, stream: bool, at_end: bool = False
) -> None:
    await respond(client, record, stream, None, at_end)


async def chain(client: Client, record: Record) -> None:
    """The next turn of this client's stored conversation (a new one after CHAIN_LENGTH)."""
    stored = await respond(client, record, client.rng.random() < 0.5, client.chain)
    if stored is not None and client.chain_turns + 1 < CHAIN_LENGTH:
        client.chain = stored
        client.chain_turns += 1
    else:
        client.chain, client.chain_turns = None, 0


async def embeddings(client: Client, record: Record) -> None:
    texts = [prompt(client.rng) for _ in range(client.rng.randint(1, 4))]
    body = {"model": EMBEDDER, "input": texts, "encoding_format": "float"}
    response = await client.http.post("/v1/embeddings", json=body, headers=client.auth)
    if answered(record, response) and len(response.json()["data"]) != len(texts):
        record.failure, record.error = "check", "wrong number of embeddings"


async def tools(client: Client, record: Record) -> None:
    """A forced call of a function, through Chat Completions or Responses at random."""
    ask = "What is the weather in Paris?"
    if client.rng.random() < 0.5:
        function = {"name": "get_weather", "parameters": WEATHER_PARAMETERS}
        body: dict[str, Any] = {
            "model": record.model, "messages": [{"role": "user", "content": ask}],
            "tools": [{"type": "function", "function": function}], "tool_choice": "required",
            "max_tokens": 64,
        }  # fmt: skip
        response = await client.http.post("/v1/chat/completions", json=body, headers=client.auth)
        if answered(record, response):
            answer = response.json()
            calls = answer["choices"][0]["message"].get("tool_calls") or []
            check_json(record, [c["function"]["arguments"] for c in calls], answer)
        return
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}
    body = {"model": record.model, "input": ask, "tools": [tool], "tool_choice": "required"}
    response = await client.http.post(
        "/v1/responses", json=body | {"max_output_tokens": 64, "store": False}, headers=client.auth
    )
    if answered(record, response):
        output = response.json()["output"]
        calls = [item["arguments"] for item in output if item["type"] == "function_call"]
        check_json(record, calls, response.json())


async def json_schema(client: Client, record: Record) -> None:
    """Output constrained to a JSON schema, through Chat Completions or Responses at random."""
    ask = [{"role": "user", "content": "Describe an animal as JSON."}]
    if client.rng.random() < 0.5:
        schema = {"name": "animal", "schema": ANIMAL, "strict": True}
        body = {"model": record.model, "messages": ask, "max_tokens": 96,
                "response_format": {"type": "json_schema", "json_schema": schema}}  # fmt: skip
        response = await client.http.post("/v1/chat/completions", json=body, headers=client.auth)
        if answered(record, response):
            answer = response.json()
            check_json(record, [answer["choices"][0]["message"]["content"]], answer)
        return
    text = {"format": {"type": "json_schema", "name": "animal", "schema": ANIMAL, "strict": True}}
    body = {"model": record.model, "input": ask, "text": text, "max_output_tokens": 96,
            "store": False}  # fmt: skip
    response = await client.http.post("/v1/responses", json=body, headers=client.auth)
    if answered(record, response):
        finished = response.json()
        texts = [
            c["text"] for i in finished["output"] if i["type"] == "message" for c in i["content"]
        ]
        check_json(record, texts, finished)


def check_json(record: Record, texts: list[str], answer: dict[str, Any]) -> None:
    """A forced call or constrained output must be there and parse, unless cut by the length."""
    usage = answer.get("usage") or {}
    record.tokens = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    reasons = {choice.get("finish_reason") for choice in answer.get("choices", [])}
    if "length" in reasons or answer.get("status") == "incomplete":
        return
    try:
        if not texts:
            raise ValueError("nothing")
        for text in texts:
            json.loads(text)
    except ValueError as exc:
        record.failure, record.error = "check", f"no valid JSON where it was forced: {exc}"


# --- hostile requests ------------------------------------------------------------------------


async def hostile(client: Client, record: Record) -> None:
    """A request the server must refuse, each kind with its own status (HOSTILE_STATUS)."""
    name = record.kind.removeprefix("hostile:")
    http, url, auth = client.http, client.run.server.url, client.auth
    chat_body = {"model": PINNED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    json_type = {"Content-Type": "application/json"}
    if name == "bad_json":
        response = await http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                                   headers=auth | json_type)  # fmt: skip
    elif name == "huge_body":
        size = int(client.run.config.max_body_mb * 2**20) + 2**16
        content = b'{"model": "' + b"x" * size + b'"}'
        response = await http.post("/v1/embeddings", content=content, headers=auth | json_type)
    elif name == "cross_origin":
        origin = {"Origin": "http://evil.example"}
        response = await http.post("/v1/chat/completions", json=chat_body, headers=auth | origin)
    elif name == "evil_host":
        response = await http.get("/v1/models", headers=auth | {"Host": "evil.example"})
    elif name == "wrong_key":
        response = await http.get("/v1/models", headers={"Authorization": "Bearer sk-not-a-key"})
    elif name == "no_key":
        response = await http.get("/v1/models")
    elif name == "user_key_on_admin":
        response = await http.get("/admin/models", headers=auth)
    elif name == "other_keys_response":
        response = await http.get(f"/v1/responses/{others_response(client)}", headers=auth)
    elif name == "text_plain_with_origin":
        headers = auth | {"Content-Type": "text/plain", "Origin": url}
        response = await http.post(
            "/v1/chat/completions", content=json.dumps(chat_body), headers=headers
        )
    else:  # invalid_params
        body = chat_body | {"temperature": 9}
        response = await http.post("/v1/chat/completions", json=body, headers=auth)
    if answered(record, response):
        record.failure, record.error = "check", f"a hostile request was answered {record.status}"


def others_response(client: Client) -> str:
    """A stored response of another key (an unknown id when there is none yet)."""
    theirs = [rid for rid, s in client.run.stored.items() if s.key != client.key]
    return client.rng.choice(theirs) if theirs else "resp_nobody_stored_this_one"


# --- clients -----------------------------------------------------------------------------------

ACTIONS: dict[str, Callable[[Client, Record], Awaitable[None]]] = {
    "chat": lambda c, r: chat(c, r, stream=False),
    "chat_stream": lambda c, r: chat(c, r, stream=True),
    "responses": lambda c, r: stored_response(c, r, stream=False),
    "responses_stream": lambda c, r: stored_response(c, r, stream=True),
    "responses_stream_hung_up_at_end": lambda c, r: stored_response(c, r, True, at_end=True),
    "chain": chain,
    "embeddings": embeddings,
    "tools": tools,
    "json_schema": json_schema,
}


async def attempt(client: Client, kind: str, model: str) -> Record:
    """One request of `kind`, its outcome recorded as the client saw it."""
    run = client.run
    record = Record(kind, model, client.key_name, run.now())
    action = hostile if kind.startswith("hostile:") else ACTIONS[kind]
    try:
        await action(client, record)
    except httpx.ReadTimeout:
        record.failure, record.error = "hang", f"no byte for {run.config.hang_timeout:.0f} s"
    except httpx.HTTPError as exc:
        record.failure, record.error = "transport", f"{type(exc).__name__}: {exc}"[:120]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        record.failure, record.error = "check", f"unreadable answer: {exc!r}"[:120]
    record.ended = run.now()
    run.records.append(record)
    return record


async def pause_after(client: Client, record: Record) -> None:
    """Honour Retry-After (429, 503); give a server that is down a second to come back."""
    wait = 0.0
    if record.retry_after is not None:
        wait = min(record.retry_after, 60.0) + client.rng.random()
    elif record.failure == "transport":
        wait = 1.0
    await asyncio.sleep(min(wait, max(0.0, client.run.config.seconds - client.run.now())))


def http_client(run: Run) -> httpx.AsyncClient:
    timeout = httpx.Timeout(run.config.hang_timeout, connect=10.0)
    return httpx.AsyncClient(base_url=run.server.url, timeout=timeout)


async def user(run: Run, index: int) -> None:
    """A client: the mix of request kinds until the end of the run, one at a time."""
    names = sorted(run.keys.users)
    name = names[index % len(names)]
    rng = random.Random(run.config.seed * 1000 + index)
    async with http_client(run) as http:
        client = Client(run, http, rng, name, run.keys.users[name])
        while not run.over():
            if rng.random() < HOSTILE_SHARE:
                kind, model = f"hostile:{run.next_hostile()}", PINNED
            else:
                kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
                model = EMBEDDER if kind == "embeddings" else client.model()
            await pause_after(client, await attempt(client, kind, model))


async def every_hostile_kind(run: Run) -> None:
    """One request of each hostile kind early on, so even a short run tries them all."""
    name = sorted(run.keys.users)[0]
    async with http_client(run) as http:
        client = Client(run, http, random.Random(run.config.seed), name, run.keys.users[name])
        for kind in HOSTILE_STATUS:
            await attempt(client, f"hostile:{kind}", PINNED)


async def burst(run: Run) -> None:
    """A client on a key of its own that asks as fast as it is let: it meets its rate limit
    and must be told when to come back."""
    name, key = run.keys.burst
    async with http_client(run) as http:
        client = Client(run, http, random.Random(run.config.seed - 1), name, key)
        while not run.over():
            await pause_after(client, await attempt(client, "embeddings", EMBEDDER))


# --- measuring and faults ----------------------------------------------------------------------


async def sample_until_done(run: Run) -> None:
    """RSS and open files of the server and its engines every --sample-every seconds."""
    async with httpx.AsyncClient(base_url=run.server.url, timeout=5) as http:
        while not run.clients_done:
            engines: list[EngineProcess] | None = None
            pid = run.server.pid
            if pid is not None:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    engines = await engine_processes(http)
            run.samples.append(measure(run.now(), run.server.pid, engines))
            await asyncio.sleep(run.config.sample_every)


async def swap_second_model(run: Run) -> None:
    """Phases of requests for the second model, each once it has been unloaded again."""
    async with httpx.AsyncClient(base_url=run.server.url, timeout=10) as http:
        while not run.over():
            run.second_wanted = True
            await asyncio.sleep(PHASE_S)
            run.second_wanted = False
            while not run.over() and await second_model_loaded(http):
                await asyncio.sleep(1)
            await asyncio.sleep(GAP_S)


async def second_model_loaded(http: httpx.AsyncClient) -> bool:
    """Whether /health lists the second model's engine (yes, too, while the server is down)."""
    try:
        return any(e.model == SECOND for e in await engine_processes(http))
    except (httpx.HTTPError, ValueError, KeyError):
        return True


async def inject_faults(run: Run) -> None:
    """The faults of the plan, each at its time; each recorded once it has recovered."""
    kills = 0
    for at, kind in run.config.fault_plan():
        await asyncio.sleep(max(0.0, at - run.now()))
        if run.over():
            return
        if kind == "server":
            run.faults.append(await kill_server(run))
        else:
            run.faults.append(await kill_engine(run, kills))
            kills += 1


def kill_target(engines: list[EngineProcess], kills: int) -> EngineProcess | None:
    """The pinned model's engine, the embedding model's, the second model's, in turn (the
    pinned one again when the second is not loaded)."""
    order = [PINNED, EMBEDDER, SECOND]
    by_model = {e.model: e for e in engines if e.state == "ready"}
    return by_model.get(order[kills % len(order)]) or by_model.get(PINNED)


async def kill_engine(run: Run, kills: int) -> Fault:
    """SIGKILL one engine process (a child of the server) and wait for its model to serve."""
    async with httpx.AsyncClient(base_url=run.server.url, timeout=10) as http:
        target = kill_target(await engine_processes(http), kills)
        children = {pid for pid, _ in descendants(run.server.pid or 0)}
        if target is None or target.pid not in children:
            return Fault("engine_kill", run.now(), details={"error": "no engine process found"})
        os.kill(target.pid, signal.SIGKILL)
        fault = Fault("engine_kill", run.now(), target.model, target.pid)
        fault.recovered = await engine_back(run, http, target, timeout=180)
    fault.details["recovered_after_s"] = round((fault.recovered or run.now()) - fault.at, 1)
    return fault


async def engine_back(
    run: Run, http: httpx.AsyncClient, killed: EngineProcess, timeout: float
) -> float | None:
    """When the killed engine's model serves again from a new process (or, for a model loaded
    on demand, is no longer loaded); None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            now = {e.model: e for e in await engine_processes(http)}
            again = now.get(killed.model)
            if again is not None and again.pid != killed.pid and again.state == "ready":
                return run.now()
            if again is None and killed.model == SECOND:
                return run.now()
        await asyncio.sleep(0.5)
    return None


async def kill_server(run: Run) -> Fault:
    """SIGKILL the server mid-load; then: its engines must go, its store must be sound and
    hold every response it answered as stored; then start it again, same flags."""
    server = run.server
    killed_pid = server.pid or 0
    left = server.kill()
    fault = Fault("server_kill", run.now(), pid=killed_pid)
    still, waited = await wait_gone(left, timeout=15)
    end_processes(still)
    store = check_store(server.store_path)
    answered_before = {rid: s for rid, s in run.stored.items() if s.at <= fault.at}
    missing = sorted(set(answered_before) - store.ids)
    server.start()
    await server.wait_ready(timeout=600)
    fault.recovered = run.now()
    fault.details = {
        "engine_processes": len(left),
        "engines_left_after_15s": [pid for pid, _ in still],
        "engines_gone_after_s": round(waited, 1),
        "integrity_check": store.integrity,
        "stored_answered": len(answered_before),
        "stored_in_file": len(store.ids),
        "stored_missing": [
            {
                "id": rid,
                "streamed": answered_before[rid].streamed,
                "answered_s_before_kill": round(fault.at - answered_before[rid].at, 2),
            }
            for rid in missing[:20]
        ],
        "stored_missing_count": len(missing),
        "restart_s": round(fault.recovered - fault.at, 1),
    }
    return fault


# --- the end -----------------------------------------------------------------------------------


async def get_stored(http: httpx.AsyncClient, response_id: str, key: str) -> int:
    """GET a stored response with `key`: its status, after waiting out any 429."""
    for _ in range(4):
        response = await http.get(
            f"/v1/responses/{response_id}", headers={"Authorization": f"Bearer {key}"}
        )
        if response.status_code != 429:
            return response.status_code
        await asyncio.sleep(min(float(response.headers.get("retry-after", "5")), 65.0))
    return 429


async def hang_up_at_end(run: Run) -> dict[str, int]:
    """A stored response streamed to a client that hangs up as soon as it has its
    response.completed event (an SDK user breaking out of the loop there), on an idle server,
    so the server has every chance to notice that it left before it stores the response;
    its id and the status of a GET a second later."""
    name = sorted(run.keys.users)[-1]
    async with http_client(run) as http:
        client = Client(run, http, random.Random(run.config.seed), name, run.keys.users[name])
        record = await attempt(client, "responses_stream_hung_up_at_end", PINNED)
        ids = [rid for rid, stored in run.stored.items() if stored.hung_up_at_end]
        if record.failure or not ids:
            return {}
        await asyncio.sleep(1)
        return {ids[-1]: await get_stored(http, ids[-1], client.key)}


async def stored_over_http(run: Run, count: int = 20) -> dict[str, Any]:
    """Stored responses spread over the run: each one its key can read, another key cannot."""
    ids = [rid for rid, stored in run.stored.items() if not stored.hung_up_at_end]
    picked = ids[:: max(1, len(ids) // count)][:count]
    found: dict[str, list[str]] = {"owner_not_200": [], "other_key_not_404": []}
    async with http_client(run) as http:
        for rid in picked:
            owner = run.stored[rid].key
            other = next(k for k in run.keys.users.values() if k != owner)
            if (status := await get_stored(http, rid, owner)) != 200:
                found["owner_not_200"].append(f"{rid}: {status}")
            if (status := await get_stored(http, rid, other)) != 404:
                found["other_key_not_404"].append(f"{rid}: {status}")
    return {"checked": len(picked), **found}


async def finish(run: Run) -> dict[str, Any]:
    """After the load: stored responses read back, the server stopped as an operator would,
    then no engine may be left and the store must hold every stored response of the run."""
    left_early = await hang_up_at_end(run)
    over_http = await stored_over_http(run)
    left = run.server.stop()
    still, waited = await wait_gone(left, timeout=15)
    end_processes(still)
    store = check_store(run.server.store_path)
    missing = sorted(set(run.stored) - store.ids - set(left_early))
    return {
        "stored_over_http": over_http,
        "stored_though_client_left_after_completed": {
            rid: status == 200 and rid in store.ids for rid, status in left_early.items()
        },
        "integrity_check": store.integrity,
        "stored_answered": len(run.stored),
        "stored_missing": [
            {"id": rid, **asdict(run.stored[rid]), "key": "(its key)"} for rid in missing[:20]
        ],
        "stored_missing_count": len(missing),
        "engine_processes_at_stop": len(left),
        "engines_left_after_stop": [pid for pid, _ in still],
        "engines_gone_after_s": round(waited, 1),
    }


GROWTH_METRICS = ("rss_server", "rss_base", "fds_server", "fds_base")


def verdict(run: Run, final: dict[str, Any]) -> dict[str, Any]:
    """The report: outcomes, growth between faults, faults, the criteria."""
    end = run.now()
    config = run.config
    tokens_per_second(run.records, run.samples)
    # Compared up to the end of the load: then the clients leave and the server goes idle.
    found = windows(run.samples, run.faults, config.warmup_min * 60, min(end, config.seconds))
    growth = [c for m in GROWTH_METRICS for c in comparisons(found, run.faults, m)]
    outcomes = tally(run.records, run.faults, end)
    swaps = second_model_swaps(run.samples)
    kills = [f for f in run.faults if f.kind == "server_kill"]

    def flat(prefix: str) -> bool:
        chosen = [c for c in growth if c["metric"].startswith(prefix)]
        return bool(chosen) and all(c["growth_pct"] < GROWTH_LIMIT_PCT for c in chosen)

    http_checks = final["stored_over_http"]
    criteria = {
        "requests_answered": outcomes["answered"] > 0,
        "no_unexplained_outcome": outcomes["unexplained"] == 0,
        "no_hang": outcomes["hangs"] == 0,
        "faults_injected_and_recovered": len(run.faults) == len(config.fault_plan())
        and all(f.recovered is not None and "error" not in f.details for f in run.faults),
        "rss_flat_after_warmup": flat("rss"),
        "open_files_flat_after_warmup": flat("fds"),
        "store_sound_after_server_kill": all(
            f.details["integrity_check"] == "ok" and not f.details["stored_missing_count"]
            for f in kills
        ),
        "stored_responses_all_there_at_end": final["integrity_check"] == "ok"
        and final["stored_answered"] > 0
        and not final["stored_missing_count"],
        "stored_responses_private_to_their_key": http_checks["checked"] > 0
        and not http_checks["owner_not_200"]
        and not http_checks["other_key_not_404"],
        "stored_though_client_left_after_completed": bool(
            final["stored_though_client_left_after_completed"]
        )
        and all(final["stored_though_client_left_after_completed"].values()),
        "no_engine_left_behind": not final["engines_left_after_stop"]
        and all(not f.details["engines_left_after_15s"] for f in kills),
        "second_model_swapped": swaps["loads"] >= 2 and swaps["unloads"] >= 1,
    }
    return {
        "minutes": config.minutes,
        "elapsed_s": round(end, 1),
        "config": asdict(config),
        "server_command": run.server.command(),
        "workdir": str(run.server.workdir),
        **outcomes,
        "tokens_per_s": round(sum(r.tokens for r in run.records) / end, 1),
        "growth": growth,
        "second_model": swaps,
        "faults": [asdict(f) for f in run.faults],
        "final": final,
        "criteria": criteria,
        "passed": all(criteria.values()),
        "samples": [asdict(s) for s in run.samples],
        "records": [asdict(r) for r in run.records],
    }


async def soak(config: Config, workdir: Path, port: int, extra: list[str]) -> dict[str, Any]:
    """The whole soak against a server of its own in `workdir`; its report."""
    keys = write_keys(workdir / "keys.txt", config.users)
    place_second_model(workdir / "models")
    server = Server(workdir, port, [*config.serve_args(workdir / "keys.txt"), *extra])
    server.start()
    try:
        await server.wait_ready(timeout=900)
        run = Run(config, keys, server)
        sampler = asyncio.create_task(sample_until_done(run))
        faults = asyncio.create_task(inject_faults(run))
        try:
            await asyncio.gather(
                every_hostile_kind(run),
                burst(run),
                swap_second_model(run),
                *(user(run, index) for index in range(config.concurrency)),
            )
            await faults
        finally:
            run.clients_done = True
            await sampler
        return verdict(run, await finish(run))
    finally:
        stray: list[ProcessId] = server.stop(timeout=30)
        end_processes([ident for ident in stray if is_running(ident)])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_args() -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=3)
    add("--concurrency", type=int, default=16, help="clients (besides the burst client)")
    add("--users", type=int, default=4, help="keys the clients share, each rate-limited")
    add("--engine", default="llama.cpp")
    add("--hang-timeout", type=float, default=300, help="seconds without a byte: a hang")
    add("--warmup", type=float, help="minutes not counted for growth (default: 1/6, <= 5)")
    add("--engine-kill-every", type=float, help="minutes (default: 10, or a third of the run)")
    add("--server-kill-at", type=float, help="minute of the server's SIGKILL (0: none)")
    add("--sample-every", type=float, help="seconds between samples (default: 5, or 3)")
    add("--rate-limit-requests", default="60/min", help="per key")
    add("--rate-limit-tokens", default="20000/min", help="per key")
    add("--keep-alive", default="10s", help="how long the second model stays loaded idle")
    add("--max-body-mb", type=float, default=1)
    add("--seed", type=int, default=0)
    add("--port", type=int, default=0, help="the server's (default: a free one)")
    add("--workdir", type=Path, help="its models, cache, logs, keys (default: a new temp dir)")
    add("--json", type=Path, help="write the report (with every sample) here")
    add("--plot", type=Path, help="write the plot (PNG) here")
    add("server_args", nargs="*", help="after --: more `serve` arguments")
    args = parser.parse_args()
    long_run = args.minutes >= 30
    every = args.engine_kill_every
    every = every if every is not None else (10 if long_run else args.minutes / 3)
    server_at = args.server_kill_at
    if server_at is None:
        server_at = args.minutes / 2 + every / 2 if long_run else args.minutes * 2 / 3
    config = Config(
        minutes=args.minutes,
        concurrency=args.concurrency,
        users=args.users,
        engine=args.engine,
        hang_timeout=args.hang_timeout,
        warmup_min=args.warmup if args.warmup is not None else min(5, max(0.5, args.minutes / 6)),
        engine_kill_every_min=every,
        server_kill_at_min=server_at,
        sample_every=args.sample_every or (5 if args.minutes >= 10 else 3),
        max_body_mb=args.max_body_mb,
        keep_alive=args.keep_alive,
        rate_limit_requests=args.rate_limit_requests,
        rate_limit_tokens=args.rate_limit_tokens,
        seed=args.seed,
    )
    return args, config


def main() -> int:
    args, config = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(config, workdir, args.port or free_port(), args.server_args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_samples = [Sample(**s) for s in report["samples"]]
        faults = [Fault(**f) for f in report["faults"]]
        plot(plot_samples, faults, config.warmup_min * 60, config.seconds, args.plot)
    print(markdown(report))
    failed = [name for name, ok in report["criteria"].items() if not ok]
    print(f"\nserver log and files: {workdir}")
    print("PASSED" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
