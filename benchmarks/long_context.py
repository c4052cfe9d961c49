"""Traffic closer to real use than `vllm-obtain bench`'s, for one server at a time.

  chat    chats whose prompts differ per request (no shared system prompt to reuse) and end
          where the model ends them (no ignore_eos, max_tokens 128), at each concurrency level
  mixed   16 clients at once: 2 send one 6,000-token prompt each (a coding agent's or a RAG
          stack's first request), 14 send short chats, 3 each; the short ones' time to first
          token and tokens/s, and whether the long ones were answered

Each run appends JSON rows to --json; `--summarize FILES` prints the tables (medians over the
runs of each server, ratios of the first server to the others) and draws the plot.

Usage: long_context.py --base-url URL --name NAME --workload chat|mixed --json OUT.json
       long_context.py --summarize OUT.json... [--plot chat.png] [--title TITLE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import defaultdict
from typing import Any

import httpx

from vllm_obtain.bench import RequestResult, one_request, percentile, plot

TOPICS = ["a lighthouse", "bicycles", "the water cycle", "tea", "bees", "autumn", "coffee",
          "volcanoes", "the moon", "trains", "chess", "rivers", "bread", "owls"]  # fmt: skip
LEVELS = {1: 8, 16: 2, 64: 1}  # streams: requests per client
LONG_PROMPT_TOKENS = 6000


def short_prompt(i: int) -> str:
    """A different question each time, so no two requests share more than the template."""
    return f"Question {i}: in two sentences, what is interesting about {TOPICS[i % len(TOPICS)]}?"


def long_prompt(i: int) -> str:
    """About LONG_PROMPT_TOKENS tokens of passages (SmolLM2's tokenizer: ~23 tokens a line)."""
    lines = [f"Passage {i}.{n}: record {n * 7 + i} is filed under shelf {n % 53}." for n in
             range(LONG_PROMPT_TOKENS // 23)]  # fmt: skip
    return "\n".join(lines) + f"\nWhich shelf holds record {i + 70}? Answer briefly."


def body(model: str, prompt: str, max_tokens: int, *, ignore_eos: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"ignore_eos": True} if ignore_eos else {}),
    }


def summary(results: list[RequestResult], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    tokens = sum(r.tokens or len(r.gaps_s) + 1 for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_sample": next((r.error for r in results if r.error), None),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
    }


async def chat_level(url: str, model: str, streams: int, counter: list[int]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=80)) as client:
        results: list[RequestResult] = []

        async def client_loop() -> None:
            for _ in range(LEVELS[streams]):
                counter[0] += 1
                prompt = short_prompt(counter[0])
                results.append(
                    await one_request(client, url, body(model, prompt, 128, ignore_eos=False))
                )

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(streams)))
        return {"concurrency": streams, **summary(results, time.perf_counter() - started)}


async def mixed(url: str, model: str, seed: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=40)) as client:
        shorts: list[RequestResult] = []

        async def short_client(c: int) -> None:
            for k in range(3):
                prompt = short_prompt(1000 * seed + 10 * c + k)
                shorts.append(
                    await one_request(client, url, body(model, prompt, 128, ignore_eos=True))
                )

        async def long_client(c: int) -> RequestResult:
            prompt = long_prompt(100 * seed + c)
            return await one_request(client, url, body(model, prompt, 64, ignore_eos=True))

        started = time.perf_counter()
        long_requests = asyncio.gather(*(long_client(c) for c in range(2)))
        await asyncio.gather(long_requests, *(short_client(c) for c in range(14)))
        longs = long_requests.result()
        wall = time.perf_counter() - started
    return {
        "concurrency": 16,
        **summary(shorts, wall),
        "long_answered": sum(r.error is None for r in longs),
        "long_ttft_ms": [round(r.ttft_s * 1000) if r.ttft_s else None for r in longs],
        "long_error": next((r.error for r in longs if r.error), None),
        "wall_s": round(wall, 1),
    }


async def run(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    if args.workload == "chat":
        counter = [args.seed * 10_000]
        await chat_level(args.base_url, args.model, 1, counter)  # warm-up, unmeasured
        for streams in LEVELS:
            rows.append(await chat_level(args.base_url, args.model, streams, counter))
    else:
        rows.append(await mixed(args.base_url, args.model, args.seed))
    for row in rows:
        row.update(name=args.name, workload=args.workload, url=args.name)
        print(json.dumps(row))
    try:
        with open(args.json, encoding="utf-8") as existing:
            rows = json.load(existing) + rows
    except FileNotFoundError:
        pass
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(rows, out, indent=1)


def summarize(paths: list[str], plot_path: str | None, title: str) -> None:
    rows: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as report:
            rows += json.load(report)
    names = list(dict.fromkeys(row["name"] for row in rows))
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["workload"], row["name"], row["concurrency"])].append(row)

    def med(workload: str, name: str, level: int, field: str) -> float | None:
        values = [r[field] for r in groups.get((workload, name, level), []) if r.get(field)]
        return statistics.median(values) if values else None

    first = names[0]
    print("Chats with distinct prompts, ended by the model (medians over the runs):\n")
    print("| streams | server | tok/s | TTFT p50 ms | TTFT p99 ms | errors | "
          f"{first} / server: tok/s | TTFT p50 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    merged = []
    for level in LEVELS:
        for name in names:
            rate = med("chat", name, level, "output_tokens_per_s")
            if rate is None:
                continue
            p50 = med("chat", name, level, "ttft_p50_ms")
            p99 = med("chat", name, level, "ttft_p99_ms")
            errors = sum(r["errors"] for r in groups[("chat", name, level)])
            ours = med("chat", first, level, "output_tokens_per_s")
            ours_p50 = med("chat", first, level, "ttft_p50_ms")
            ratio = f"{ours / rate:.2f}x" if ours else "-"
            ttft_ratio = f"{ours_p50 / p50:.2f}x" if ours_p50 and p50 else "-"
            print(f"| {level} | {name} | {rate:.1f} | {p50:.0f} | {p99:.0f} | {errors} | "
                  f"{ratio} | {ttft_ratio} |")  # fmt: skip
            merged.append({"name": name, "concurrency": level, "output_tokens_per_s": rate,
                           "ttft_p50_ms": p50, "url": name})  # fmt: skip
    print("\n16 streams, 2 of them with a 6,000-token prompt (medians over the runs):\n")
    print("| server | short tok/s | short TTFT p50 ms | short TTFT p99 ms | long answered | "
          f"long TTFT ms | {first} / server: short TTFT p50 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in names:
        runs = groups.get(("mixed", name, 16), [])
        if not runs:
            continue
        p50 = med("mixed", name, 16, "ttft_p50_ms")
        ours_p50 = med("mixed", first, 16, "ttft_p50_ms")
        answered = ", ".join(f"{r['long_answered']}/2" for r in runs)
        long_ttft = "; ".join(str(r["long_ttft_ms"]) for r in runs)
        ratio = f"{ours_p50 / p50:.2f}x" if ours_p50 and p50 else "-"
        print(f"| {name} | {med('mixed', name, 16, 'output_tokens_per_s'):.1f} | {p50:.0f} | "
              f"{med('mixed', name, 16, 'ttft_p99_ms'):.0f} | {answered} | {long_ttft} | "
              f"{ratio} |")  # fmt: skip
    if plot_path:
        plot(merged, plot_path, title=title)
        print(f"\nplot: {plot_path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url")
    parser.add_argument("--name", default="")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--workload", choices=["chat", "mixed"], default="chat")
    parser.add_argument("--seed", type=int, default=0, help="varies the prompts between runs")
    parser.add_argument("--json")
    parser.add_argument("--summarize", nargs="+")
    parser.add_argument("--plot")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.plot, args.title)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
