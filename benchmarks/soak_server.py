"""The server a soak runs against, and what the soak measures and checks on it.

One `vllm-obtain serve` with named keys and rate limits, the embedded model pinned and a second
model (a hard link to the same GGUF under another name) loaded on demand; its engine processes
found through /health and killed; its memory and open files sampled; after a SIGKILL, the
engines it leaves behind and its responses store (SQLite) inspected before it is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from vllm_obtain.weights.catalog import load_catalog, packaged_file

PINNED = "smollm2-135m-instruct"
SECOND = "soak-second"  # the file stem, lower-cased: the id the server gives the copy
EMBEDDER = "all-minilm-l6-v2"
# wiring.build_response_store: the store's file in the cache directory.
STORE_FILE = "responses.sqlite3"
MIB = 2**20

# A process by pid and start time, so a reused pid is not taken for the same process.
ProcessId = tuple[int, float]


@dataclass(frozen=True)
class Keys:
    """The keys file's keys: the clients' (by name), a key for a client that runs into its rate
    limit on purpose, and an admin key (in the file as an operator's would be; unused)."""

    users: dict[str, str]
    burst: tuple[str, str]
    admin: tuple[str, str]


def write_keys(path: Path, users: int) -> Keys:
    """A keys file (`NAME: KEY`, `NAME: KEY admin`) with fresh random keys."""
    keys = Keys(
        users={f"user{i}": f"sk-soak-{secrets.token_hex(12)}" for i in range(1, users + 1)},
        burst=("burst", f"sk-soak-{secrets.token_hex(12)}"),
        admin=("ops", f"sk-soak-{secrets.token_hex(12)}"),
    )
    lines = ["# soak keys: one per client group, one admin"]
    lines += [f"{name}: {key}" for name, key in [*keys.users.items(), keys.burst]]
    lines.append(f"{keys.admin[0]}: {keys.admin[1]} admin")
    path.write_text("\n".join(lines) + "\n")
    return keys


def embedded_gguf() -> Path:
    """The pinned model's GGUF, embedded in a package (the catalogue says which)."""
    source = load_catalog()["models"][PINNED]["llama.cpp"]
    return packaged_file(source["package"], source["file"])


def place_second_model(models_dir: Path) -> None:
    """The embedded GGUF again under another name: a hard link, else a copy. Not a symlink:
    the server serves each file once, by its resolved path, so a symlink would be hidden."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{SECOND}.gguf"
    if target.exists():
        return
    source = embedded_gguf()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass
class Server:
    """`vllm-obtain serve` as a child of this process, started again with the same flags."""

    workdir: Path
    port: int
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_path(self) -> Path:
        return self.workdir / "cache" / STORE_FILE

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm_obtain", "serve", PINNED, "--port", str(self.port),
            "--host", "127.0.0.1", "--mode", "prod",
            "--models-dir", str(self.workdir / "models"),
            "--cache-dir", str(self.workdir / "cache"), "--logs-dir", str(self.workdir / "logs"),
            *self.args,
        ]  # fmt: skip

    def start(self) -> None:
        # The server reads OBTAIN_* settings from the environment; a soak uses its flags only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OBTAIN_")}
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n--- soak: start {self.starts}: {' '.join(self.command())}\n")
            log.flush()
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )

    @property
    def pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    async def wait_ready(self, timeout: float) -> None:
        """Until /health/ready answers 200; SystemExit if the server exits or never is."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            while time.monotonic() < deadline:
                if self.pid is None:
                    raise SystemExit(f"the server exited; see {self.log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health/ready")).status_code == 200:
                        return
                await asyncio.sleep(0.25)
        raise SystemExit(f"the server was not ready within {timeout:.0f} s; see {self.log_path}")

    def kill(self) -> list[ProcessId]:
        """SIGKILL the server (its engines are left to notice); the processes it had started."""
        assert self.process is not None
        left = descendants(self.process.pid)
        self.process.kill()
        self.process.wait()
        return left

    def stop(self, timeout: float = 60) -> list[ProcessId]:
        """SIGTERM, as an operator stops it (SIGKILL after `timeout`); the processes it had."""
        if self.process is None or self.process.poll() is not None:
            return []
        left = descendants(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return left


def identify(proc: psutil.Process) -> ProcessId | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def descendants(pid: int) -> list[ProcessId]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [ident for ident in map(identify, children) if ident is not None]


def is_running(ident: ProcessId) -> bool:
    """Whether that very process still runs (a zombie has ended: only its entry is left)."""
    try:
        proc = psutil.Process(ident[0])
        return proc.create_time() == ident[1] and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def wait_gone(idents: list[ProcessId], timeout: float) -> tuple[list[ProcessId], float]:
    """Those of `idents` still running after `timeout` seconds, and how long the wait took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        running = [ident for ident in idents if is_running(ident)]
        if not running:
            break
        await asyncio.sleep(0.2)
    return [ident for ident in idents if is_running(ident)], time.monotonic() - started


def end_processes(idents: list[ProcessId]) -> None:
    """SIGKILL what a soak's server left running: this run started them."""
    for ident in idents:
        if is_running(ident):
            with contextlib.suppress(psutil.Error):
                psutil.Process(ident[0]).kill()


@dataclass(frozen=True)
class EngineProcess:
    model: str
    pid: int
    state: str
    embedding: bool


async def engine_processes(http: httpx.AsyncClient) -> list[EngineProcess]:
    """The engine processes /health reports: each loaded model's and the embedding model's."""
    body = (await http.get("/health", timeout=10)).json()
    found = [
        EngineProcess(m["id"], int(m.get("pid") or 0), m["state"], embedding=False)
        for m in body.get("models", [])
    ]
    found += [
        EngineProcess(m["id"], int(m.get("pid") or 0), m["state"], embedding=True)
        for m in body.get("embedding_models", [])
    ]
    return [engine for engine in found if engine.pid]


@dataclass
class Sample:
    """One look at the server: memory (MiB) and open files of the server process, of the
    processes always there (server, pinned model, embedding model: `base`) and of all;
    `known`: /health said which engine process is which (else `base` is the server alone)."""

    t: float
    up: bool
    known: bool = False
    rss_server: float = 0.0
    rss_base: float = 0.0
    rss_total: float = 0.0
    fds_server: int = 0
    fds_base: int = 0
    fds_total: int = 0
    engines: dict[str, int] = field(default_factory=dict)
    tokens_per_s: float = 0.0


def measure(t: float, server_pid: int | None, engines: list[EngineProcess] | None) -> Sample:
    """RSS and open files of the server and its descendants; `engines` (from /health; None
    when it did not answer) says which descendant is which model."""
    if server_pid is None:
        return Sample(t, up=False)
    try:
        root = psutil.Process(server_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return Sample(t, up=False)
    engines = engines or []
    base_pids = {server_pid} | {e.pid for e in engines if e.model != SECOND}
    sample = Sample(t, up=True, known=bool(engines), engines={e.model: e.pid for e in engines})
    for proc in procs:
        try:
            rss, fds = proc.memory_info().rss / MIB, proc.num_fds()
        except psutil.Error:
            continue  # ended between the listing and the look
        sample.rss_total += rss
        sample.fds_total += fds
        if proc.pid in base_pids:
            sample.rss_base += rss
            sample.fds_base += fds
        if proc.pid == server_pid:
            sample.rss_server, sample.fds_server = rss, fds
    return sample


@dataclass(frozen=True)
class StoreCheck:
    integrity: str  # PRAGMA integrity_check's answer: "ok" when sound
    ids: frozenset[str]


def check_store(path: Path) -> StoreCheck:
    """The responses store as the server left it: read-only, its WAL included."""
    if not path.exists():
        return StoreCheck("missing: no store file", frozenset())
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("PRAGMA integrity_check").fetchall()
        integrity = "; ".join(str(row[0]) for row in rows)
        ids = frozenset(row[0] for row in db.execute("SELECT id FROM responses"))
    except sqlite3.Error as exc:
        return StoreCheck(f"error: {exc}", frozenset())
    finally:
        db.close()
    return StoreCheck(integrity, ids)
