"""Summarise `vllm-obtain bench --json` reports from one benchmarks/run.sh run: per server and
concurrency, the median over the rounds of tokens/s and TTFT p50, the ratios of the first
server to each other one, and one plot of them all.

Usage: summarize.py --plot OUT.png --title TITLE REPORT.json...
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from typing import Any

from vllm_obtain.bench import plot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--plot")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for path in args.reports:
        with open(path, encoding="utf-8") as report:
            rows += json.load(report)["results"]
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    servers: list[str] = []
    for row in rows:
        name = row.get("name") or row["url"]
        by_key[(name, row["concurrency"])].append(row)
        if name not in servers:
            servers.append(name)
    levels = sorted({level for _, level in by_key})

    def median(name: str, level: int, field: str) -> float | None:
        values = [r[field] for r in by_key.get((name, level), []) if r[field] is not None]
        return statistics.median(values) if values else None

    first = servers[0]
    print("| streams | " + " | ".join(f"{s} tok/s, TTFT p50" for s in servers) + " | "
          + " | ".join(f"{first} / {s}: tok/s, TTFT" for s in servers[1:]) + " |")  # fmt: skip
    print("|---" * (1 + len(servers) + len(servers) - 1) + "|")
    merged = []
    for level in levels:
        cells = []
        for s in servers:
            rate, ttft = median(s, level, "output_tokens_per_s"), median(s, level, "ttft_p50_ms")
            errors = sum(r["errors"] for r in by_key.get((s, level), []))
            note = f", {errors} errors" if errors else ""
            cells.append(f"{rate:.1f} tok/s, {ttft:.0f} ms{note}" if rate and ttft else "-")
            merged.append({"name": s, "concurrency": level, "output_tokens_per_s": rate,
                           "ttft_p50_ms": ttft, "url": s})  # fmt: skip
        ratios = []
        for s in servers[1:]:
            ours, theirs = (
                median(first, level, "output_tokens_per_s"),
                median(s, level, "output_tokens_per_s"),
            )
            ours_ttft, theirs_ttft = (
                median(first, level, "ttft_p50_ms"),
                median(s, level, "ttft_p50_ms"),
            )
            rate_ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
            ttft_ratio = f"{ours_ttft / theirs_ttft:.2f}x" if ours_ttft and theirs_ttft else "-"
            ratios.append(f"{rate_ratio}, {ttft_ratio}")
        print(f"| {level} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print("\n(TTFT ratio: ours / theirs, below 1 is better; medians over the rounds)")
    if args.plot:
        plot(merged, args.plot, title=args.title)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
