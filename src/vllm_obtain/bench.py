"""`vllm-obtain bench`: load-test any OpenAI-compatible server with concurrent streaming clients.

Each client sends chat completions from a fixed prompt set with a fixed output length and reads
the SSE stream; per request we record the time to the first token and the gaps between tokens.
`--compare URL2` measures a second server the same way in the same run and prints the ratios;
`--plot` draws tokens/s and time to first token against concurrency for each server.

Two rates per run: `output_tokens_per_s` is every token over the wall time (prefill and
queueing included: what a batch job sees), `decode_tokens_per_s_per_stream` is 1 / the mean gap
between tokens (what a reader of one stream sees, and what an in-process decode loop measures).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle to a child.",
    "List some ideas for a rainy weekend.",
    "Tell me about the history of tea.",
    "How do bees make honey?",
    "Write a poem about autumn leaves.",
    "What makes a good cup of coffee?",
]


@dataclass
class RequestResult:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


@dataclass
class BenchResult:
    url: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    itl_mean_ms: float | None = None
    decode_tokens_per_s_per_stream: float | None = None
    name: str = ""  # the label given for this server (or its URL)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    result = await _one_request(client, url, body)
    if result.error is not None and result.error.startswith("RemoteProtocolError"):
        # A keep-alive connection the server had just closed (llama-server closes idle ones):
        # what any HTTP client retries once, on a new connection.
        result = await _one_request(client, url, body)
    return result


async def _one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - started
                    else:
                        result.gaps_s.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_load(
    url: str,
    *,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    warmup: int,
    temperature: float = 0.7,
    seeded: bool = False,
    name: str = "",
) -> BenchResult:
    """`requests` requests through `concurrency` clients, after `warmup` unmeasured ones."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        def body(i: int) -> dict[str, Any]:
            return {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "temperature": temperature,
                # Chat front-ends send no seed; a seeded request trades some prefix reuse for
                # reproducibility on our server (see the README), so it is measured on demand.
                **({"seed": i} if seeded else {}),
                "ignore_eos": True,  # fixed output length (vLLM, llama.cpp and us honour it)
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        await asyncio.gather(*(one_request(client, url, body(i)) for i in range(warmup)))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, url, body(queue.get_nowait())))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens or len(r.gaps_s) + 1 for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    mean_gap = sum(gaps) / len(gaps) if gaps else None
    return BenchResult(
        url=url,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        wall_s=round(wall, 2),
        output_tokens=tokens,
        output_tokens_per_s=round(tokens / wall, 1),
        requests_per_s=round(len(ok) / wall, 2),
        ttft_p50_ms=ms(percentile(ttfts, 50)),
        ttft_p99_ms=ms(percentile(ttfts, 99)),
        itl_p50_ms=ms(percentile(gaps, 50)),
        itl_p99_ms=ms(percentile(gaps, 99)),
        itl_mean_ms=ms(mean_gap),
        decode_tokens_per_s_per_stream=round(1 / mean_gap, 1) if mean_gap else None,
        name=name or url,
    )


def format_table(results: list[BenchResult]) -> str:
    columns = [
        ("server", "name"), ("conc", "concurrency"), ("reqs", "requests"), ("errors", "errors"),
        ("tok/s", "output_tokens_per_s"), ("req/s", "requests_per_s"),
        ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p99 ms", "ttft_p99_ms"),
        ("ITL p50 ms", "itl_p50_ms"), ("ITL p99 ms", "itl_p99_ms"),
        ("decode tok/s/stream", "decode_tokens_per_s_per_stream"),
    ]  # fmt: skip
    rows = [[h for h, _ in columns]]
    rows += [[str(getattr(r, key)) for _, key in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def ratios(ours: BenchResult, theirs: BenchResult) -> dict[str, float | None]:
    """ours / theirs for throughput; theirs / ours for latencies (above 1: we are better)."""

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    return {
        "output_tokens_per_s": div(ours.output_tokens_per_s, theirs.output_tokens_per_s),
        "requests_per_s": div(ours.requests_per_s, theirs.requests_per_s),
        "ttft_p50_speedup": div(theirs.ttft_p50_ms, ours.ttft_p50_ms),
        "itl_p50_speedup": div(theirs.itl_p50_ms, ours.itl_p50_ms),
        "decode_per_stream": div(
            ours.decode_tokens_per_s_per_stream, theirs.decode_tokens_per_s_per_stream
        ),
    }


async def bench(
    urls: list[str],
    *,
    model: str,
    concurrency: list[int],
    requests_per_client: int,
    max_tokens: int,
    warmup: int,
    temperature: float = 0.7,
    seeded: bool = False,
    names: list[str] | None = None,
) -> dict[str, Any]:
    labels = dict(zip(urls, names or urls, strict=False))
    results: list[BenchResult] = []
    for level in concurrency:
        for url in urls:
            results.append(
                await run_load(
                    url,
                    model=model,
                    concurrency=level,
                    requests=max(level * requests_per_client, level),
                    max_tokens=max_tokens,
                    warmup=min(warmup, level),
                    temperature=temperature,
                    seeded=seeded,
                    name=labels.get(url, url),
                )
            )
    report: dict[str, Any] = {"results": [asdict(r) for r in results]}
    if len(urls) == 2:
        report["ratios"] = {
            str(level): ratios(*[r for r in results if r.concurrency == level])
            for level in concurrency
        }
    by_url = {url: {r.concurrency: r for r in results if r.url == url} for url in urls}
    scaling = {}
    for url, levels in by_url.items():
        if 1 in levels:
            base = levels[1].output_tokens_per_s
            scaling[url] = {
                str(c): round(r.output_tokens_per_s / base, 2) for c, r in levels.items()
            }
    report["scaling_vs_one_stream"] = scaling
    report["table"] = format_table(results)
    return report


def plot(results: list[dict[str, Any]], path: str, *, title: str = "") -> None:
    """Tokens/s and TTFT p50 against concurrency, one line per server (results as in the JSON
    report; several runs' results may be passed together)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    servers: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        servers.setdefault(r.get("name") or r["url"], []).append(r)
    figure, (rate, first) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in servers.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        levels = [r["concurrency"] for r in rows]
        rate.plot(levels, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)
        first.plot(levels, [r["ttft_p50_ms"] for r in rows], marker="o", label=name)
    for axes, label in ((rate, "output tokens/s"), (first, "TTFT p50 (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent streams")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    first.set_yscale("log")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
