"""What the OpenAI features cost in decoding speed, measured side by side on one server:
plain sampling against the same request with a JSON schema enforced, and with logprobs (a
forced tool call is the same JSON constraint). Rounds alternate between the variants, so load
drifts hit all of them alike.

    python benchmarks/features.py --base-url http://127.0.0.1:8001 --rounds 6

Decode speed is (completion tokens - 1) / (time of the last token - time of the first), from
the stream, so prompt processing is left out and answers of different lengths compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Describe three cats, with their names, ages and colours."}]
CAT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "colour": {"type": "string"}},
    "required": ["name", "age", "colour"],
}  # fmt: skip
SCHEMA = {"type": "object", "properties": {"cats": {"type": "array", "items": CAT}},
          "required": ["cats"]}  # fmt: skip

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    },
    "logprobs_top5": {"logprobs": True, "top_logprobs": 5},
}


def decode_rate(base_url: str, extra: dict, seed: int) -> float | None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 96, "temperature": 0.7, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    stamps: list[float] = []
    tokens = 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            delta = event["choices"][0]["delta"] if event["choices"] else {}
            if delta.get("content"):
                stamps.append(time.perf_counter())
    if tokens < 8 or len(stamps) < 2 or stamps[-1] == stamps[0]:
        return None
    return (tokens - 1) / (stamps[-1] - stamps[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8001")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    decode_rate(args.base_url, {}, 0)  # warm-up
    for round_ in range(args.rounds):
        for name, extra in VARIANTS.items():
            rate = decode_rate(args.base_url, extra, seed=round_)
            if rate is not None:
                rates[name].append(rate)
    plain = statistics.median(rates["plain"])
    report = {
        name: {"decode_tokens_per_s": round(statistics.median(r), 1),
               "vs_plain": round(statistics.median(r) / plain, 2), "runs": len(r)}
        for name, r in rates.items() if r
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
