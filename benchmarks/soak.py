"""Soak test: many concurrent clients for a bounded time, counting errors and memory growth.

    python benchmarks/soak.py --minutes 3 --concurrency 32            # starts its own server
    python benchmarks/soak.py --base-url http://host:8001 --pid 1234  # an already running one

Each client loops: streamed and plain chat requests of varied length, some that hang up in the
middle of a stream, some deliberately invalid (which must get a 4xx). A 5xx, a transport error
or a 4xx on a valid request counts as an error. The server's memory (its process and the engine
process, RSS) is sampled throughout; growth is measured from the end of the warm-up (the first
fifth of the run) to the end, so one-off allocations at start-up do not count as a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

MODEL = "smollm2-135m-instruct"
TOPICS = ["the sea", "a city at night", "bread", "trains", "winter", "a small robot", "tea"]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    tokens: int = 0

    def error(self, what: str) -> None:
        self.outcomes["error"] += 1
        if len(self.errors) < 20:
            self.errors.append(what)


def chat_body(rng: random.Random, stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write about {rng.choice(TOPICS)}."}],
        "max_tokens": rng.randint(16, 128),
        "temperature": 0.8,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def one_request(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    kind = rng.choices(["plain", "stream", "hang_up", "invalid"], weights=[40, 45, 10, 5])[0]
    path = "/v1/chat/completions"
    if kind == "invalid":
        body = {"model": MODEL, "messages": [{"role": "user"}], "temperature": 9}
        response = await http.post(path, json=body)
        if 400 <= response.status_code < 500 and "error" in response.json():
            tally.outcomes["invalid_refused"] += 1
        else:
            tally.error(f"invalid request got {response.status_code}")
        return
    if kind == "plain":
        response = await http.post(path, json=chat_body(rng, stream=False))
        if response.status_code == 429:
            tally.outcomes["429"] += 1
        elif response.status_code != 200:
            tally.error(f"plain {response.status_code}: {response.text[:200]}")
        else:
            tally.outcomes["plain_ok"] += 1
            tally.tokens += response.json()["usage"]["completion_tokens"]
        return
    async with http.stream("POST", path, json=chat_body(rng, stream=True)) as response:
        if response.status_code == 429:
            tally.outcomes["429"] += 1
            return
        if response.status_code != 200:
            tally.error(f"stream {response.status_code}")
            return
        seen = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            seen += 1
            if kind == "hang_up" and seen == 5:
                tally.outcomes["hung_up"] += 1
                return
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                tally.outcomes["stream_ok"] += 1
                return
            chunk = json.loads(payload)
            if "error" in chunk:
                tally.error(f"stream error event: {chunk['error']['message']}")
                return
            if chunk.get("usage"):
                tally.tokens += chunk["usage"]["completion_tokens"]
        tally.error("stream ended without [DONE]")


async def client(url: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < deadline:
            try:
                await one_request(http, rng, tally)
            except httpx.HTTPError as exc:
                tally.error(f"transport: {type(exc).__name__}: {exc}")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its children (the engine process), in MiB."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


async def sample_memory(pid: int, samples: list[tuple[float, float]], deadline: float) -> None:
    start = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - start, rss_mib(pid)))
        await asyncio.sleep(5)


async def soak(url: str, pid: int, minutes: float, concurrency: int) -> dict:
    seconds = minutes * 60
    deadline = time.monotonic() + seconds
    tally, samples = Tally(), list[tuple[float, float]]()
    started = time.monotonic()
    await asyncio.gather(
        sample_memory(pid, samples, deadline),
        *(client(url, seed, deadline, tally) for seed in range(concurrency)),
    )
    elapsed = time.monotonic() - started
    samples.append((elapsed, rss_mib(pid)))
    warm = next(m for t, m in samples if t >= seconds / 5)
    return {
        "minutes": minutes,
        "concurrency": concurrency,
        "requests": sum(tally.outcomes.values()),
        "outcomes": dict(tally.outcomes),
        "errors": tally.outcomes["error"],
        "error_samples": tally.errors,
        "generated_tokens_per_s": round(tally.tokens / elapsed, 1),
        "rss_mib_start": round(samples[0][1], 1),
        "rss_mib_after_warmup": round(warm, 1),
        "rss_mib_end": round(samples[-1][1], 1),
        "rss_growth_after_warmup_pct": round(100 * (samples[-1][1] - warm) / warm, 1),
    }


def start_server(port: int, args: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    log = (workdir / "soak-server.log").open("w")
    command = [sys.executable, "-m", "vllm_obtain", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited; see {workdir / 'soak-server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--base-url", help="an already running server (then also give --pid)")
    parser.add_argument("--pid", type=int, help="its process id, for memory")
    parser.add_argument("--port", type=int, default=8077, help="port for the server it starts")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="its cwd and log")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("server_args", nargs="*", help="after --: extra `serve` arguments")
    args = parser.parse_args()
    process = None
    if args.base_url:
        if args.pid is None:
            parser.error("--base-url needs --pid (the server's process id) to measure memory")
        url, pid = args.base_url, args.pid
    else:
        process = start_server(args.port, args.server_args, args.workdir)
        url, pid = f"http://127.0.0.1:{args.port}", process.pid
    try:
        report = asyncio.run(soak(url, pid, args.minutes, args.concurrency))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
