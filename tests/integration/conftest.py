"""Start the real server, once per engine: `vllm-obtain serve --engine E` with the embedded
model. Every integration test runs against each engine; an engine that is not installed shows
as skipped, with the command that installs it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from vllm_obtain.engines.registry import ENGINES

MODEL = "smollm2-135m-instruct"
# vLLM compiles its model graph on first start (minutes on 2 CPU cores; cached afterwards).
STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextlib.contextmanager
def start_server(
    workdir: Path, args: list[str], port: int, cache_dir: Path | None = None
) -> Iterator[str]:
    """`vllm-obtain serve ARGS` in its own process, until the block ends; yields its base URL."""
    with running_server(workdir, args, port, cache_dir) as server:
        yield server.url


@contextlib.contextmanager
def running_server(
    workdir: Path,
    args: list[str],
    port: int,
    cache_dir: Path | None = None,
    *,
    open_files: int | None = None,
) -> Iterator[RunningServer]:
    """As start_server, with the process at hand (for signals) and its log file; `open_files`
    caps its open-files limit (soft and hard), as a container or CI runner may."""
    log_path = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBTAIN_")}
    command = [
        sys.executable, "-m", "vllm_obtain", "serve", "--port", str(port), "--mode", "prod",
        "--logs-dir", str(workdir / "logs"), "--models-dir", str(workdir / "models"),
        "--cache-dir", str(cache_dir or workdir / "cache"), *args,
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process, log_path)
            yield RunningServer(url, process, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _limit_open_files(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session: the GGUF -> HF conversion is made once for vLLM and MLX."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session", params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    spec = ENGINES[name]
    pytest.importorskip(spec.package, reason=f"{name} engine not installed: {spec.install_hint}")
    return name


@pytest.fixture(scope="session")
def base_url(
    engine: str, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp(f"server-{engine}")
    args = ["--engine", engine]
    if engine == "vllm":
        args += ["--kv-cache-gib", "1"]
    with start_server(workdir, args, free_port(), cache_dir=shared_cache) as url:
        yield url


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            # Ready: the chat model and the embedding model (which loads beside it).
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server did not become healthy in {STARTUP_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=300)
