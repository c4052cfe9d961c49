"""Where `serve --ray` spends CPU per streamed token, in two measures:

  python benchmarks/ray_stream_cost.py
      Ray Serve alone: one deployment streams small items to another through a
      DeploymentHandle, back to back and spaced 10 ms apart (as one stream's tokens come);
      the CPU each process spends per item.
  python benchmarks/ray_stream_cost.py --server URL --pid PID
      A running `vllm-obtain serve` (plain or --ray): the CPU each of its processes spends
      over 4 streamed 128-token chats, idle first for comparison.

Needs ./install.sh --ray. A local Ray is started and stopped for the first measure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import httpx
import psutil


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    seen = {}
    for process in processes:
        try:
            times = process.cpu_times()
            seen[process.pid] = (process.name()[:48], times.user + times.system)
        except psutil.Error:
            continue
    return seen


def serve_items() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False
    )

    class Source:
        async def stream(self, count: int, gap: float) -> Any:
            for index in range(count):
                if gap:
                    await asyncio.sleep(gap)
                yield (index, b"token")

        def pid(self) -> int:
            return os.getpid()

    class Sink:
        def __init__(self, source: Any) -> None:
            self.source, self.streams = source, source.options(stream=True)

        async def drain(self, count: int, gap: float) -> float:
            started = time.perf_counter()
            async for _ in self.streams.stream.remote(count, gap):
                pass
            return time.perf_counter() - started

        async def pids(self) -> tuple[int, int]:
            return os.getpid(), await self.source.pid.remote()

    light = serve.deployment(ray_actor_options={"num_cpus": 0})
    app = light(Sink).bind(light(Source).bind())
    handle = serve.run(app, name="stream-cost", route_prefix=None)
    sink, source = (psutil.Process(pid) for pid in handle.pids.remote().result())
    handle.drain.remote(200, 0).result()  # warm
    for count, gap in ((2000, 0.0), (300, 0.01)):
        before = cpu_seconds([sink, source])
        wall = handle.drain.remote(count, gap).result()
        after = cpu_seconds([sink, source])
        spent = [(after[p.pid][1] - before[p.pid][1]) / count * 1000 for p in (sink, source)]
        print(
            f"{count} items {gap * 1000:.0f} ms apart: {wall / count * 1000:.2f} ms each; "
            f"CPU per item: receiver {spent[0]:.2f} ms, sender {spent[1]:.2f} ms"
        )
    serve.shutdown()
    ray.shutdown()


def profile_server(url: str, pid: int) -> None:
    root = psutil.Process(pid)

    def tree() -> list[psutil.Process]:
        return [root, *root.children(recursive=True)]

    def chats() -> int:
        tokens = 0
        for index in range(4):
            body = {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": f"Story {index}"}],
                "max_tokens": 128,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                tokens += sum(line.startswith("data: {") for line in r.iter_lines())
        return tokens

    for what in ("idle 10 s", "4 streamed 128-token chats"):
        before, started = cpu_seconds(tree()), time.perf_counter()
        if what.startswith("idle"):
            time.sleep(10)
        else:
            chats()
        after, wall = cpu_seconds(tree()), time.perf_counter() - started
        rows = sorted(
            ((after[k][1] - before.get(k, ("", after[k][1]))[1], after[k][0]) for k in after),
            reverse=True,
        )
        print(f"== {what}: {wall:.1f} s, {sum(r[0] for r in rows):.2f} CPU-seconds in all")
        for spent, name in rows[:10]:
            print(f"  {spent:6.2f} s  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", help="a running server's URL")
    parser.add_argument("--pid", type=int, help="its process id")
    args = parser.parse_args()
    if args.server:
        profile_server(args.server, args.pid)
    else:
        serve_items()


if __name__ == "__main__":
    main()
