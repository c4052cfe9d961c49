"""Start the real server once per session: `vllm-obtain serve` with the embedded model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    port = _free_port()
    workdir: Path = tmp_path_factory.mktemp("server")
    log = (workdir / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBTAIN_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_obtain",
            "serve",
            "--port",
            str(port),
            "--mode",
            "prod",
            "--logs-dir",
            str(workdir / "logs"),
            "--models-dir",
            str(workdir / "models"),
            "--cache-dir",
            str(workdir / "cache"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"server exited: {(workdir / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail("server did not become healthy in 120 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)
