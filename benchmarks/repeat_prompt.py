"""Time to first token when a chat history comes back with one more message, as chat front-ends
send it every turn: the first request of each conversation fills the server's cache, the second
(the same ~500-token history, the answer, one new question) should reuse all of it.

Prints JSON per server: the median TTFT of the first and of the second requests over several
conversations (each with its own history, so nothing is shared between conversations), the
servers measured in turn, conversation by conversation.

Usage: repeat_prompt.py --model NAME URL[=LABEL]...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx

TOPICS = ["lighthouses", "bees", "volcanoes", "tea", "bicycles", "the moon", "chess", "bread"]


def history(topic: str) -> list[dict[str, str]]:
    """About 500 tokens of conversation on one topic."""
    notes = " ".join(
        f"Fact {i} about {topic}: it is worth a short, careful answer." for i in range(24)
    )
    return [
        {"role": "system", "content": f"You are an expert on {topic}. {notes}"},
        {"role": "user", "content": f"Tell me something about {topic}."},
        {"role": "assistant", "content": f"{topic.capitalize()} have a long history. " * 6},
        {"role": "user", "content": "Go on, briefly."},
    ]


def first_token_time(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, str]:
    """Seconds to the first content token, and the whole answer."""
    try:
        return _first_token_time(client, url, body)
    except httpx.RemoteProtocolError:
        # A keep-alive connection the server had just closed (llama-server closes idle ones):
        # what any HTTP client retries once, on a new connection.
        return _first_token_time(client, url, body)


def _first_token_time(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, str]:
    started, first, text = time.perf_counter(), None, []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            piece = choices[0].get("delta", {}).get("content") if choices else None
            if piece:
                first = first if first is not None else time.perf_counter() - started
                text.append(piece)
    assert first is not None, "no content came back"
    return first, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("servers", nargs="+", help="URL or URL=LABEL")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--conversations", type=int, default=6)
    args = parser.parse_args()
    servers = [s.partition("=")[::2] for s in args.servers]
    times: dict[str, dict[str, list[float]]] = {}
    with httpx.Client(timeout=300) as client:
        for i in range(args.conversations):
            topic = f"{TOPICS[i % len(TOPICS)]} (conversation {i})"
            for url, label in servers:
                messages = history(topic)
                body = {"model": args.model, "max_tokens": 24, "temperature": 0, "stream": True}
                first, answer = first_token_time(client, url, {**body, "messages": messages})
                messages += [{"role": "assistant", "content": answer},
                             {"role": "user", "content": "And one more thing?"}]  # fmt: skip
                second, _ = first_token_time(client, url, {**body, "messages": messages})
                entry = times.setdefault(label or url, {"first": [], "second": []})
                entry["first"].append(first)
                entry["second"].append(second)
    for name, entry in times.items():
        print(json.dumps({
            "server": name,
            "ttft_first_ms": round(statistics.median(entry["first"]) * 1000, 1),
            "ttft_second_ms": round(statistics.median(entry["second"]) * 1000, 1),
            "conversations": len(entry["first"]),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
