"""POST /admin/pull on the real server, guarded: a URL on 127.0.0.1 is refused by a server left
at its defaults (the stream's last line names --pull-allow-host), and fetched, then served, by
one started with --pull-allow-http --pull-allow-host 127.0.0.1. The refusal reuses the
session's llama.cpp server, so the suite starts one server more, not two."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.integration.conftest import MODEL, free_port, start_server
from vllm_obtain.weights.catalog import load_catalog, packaged_file

pytest.importorskip("llama_cpp", reason="the pull tests run on llama.cpp")


def embedded_gguf() -> Path:
    source = load_catalog()["models"][MODEL]["llama.cpp"]
    return packaged_file(source["package"], source["file"])


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def gguf_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded model's GGUF as x.gguf, on a plain-http server on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("web")
    (folder / "x.gguf").symlink_to(embedded_gguf())
    web = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=folder))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{web.server_address[1]}/x.gguf"
    finally:
        web.shutdown()
        web.server_close()


def pull_lines(url: str, name: str) -> list[dict]:
    with httpx.stream("POST", f"{url}/admin/pull", json={"name": name}, timeout=120) as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line]


def listed(url: str) -> set[str]:
    return {model["id"] for model in httpx.get(f"{url}/admin/models", timeout=10).json()["data"]}


@pytest.mark.parametrize("engine", ["llama.cpp"], indirect=True)
def test_a_server_at_its_defaults_refuses_a_pull_from_127_0_0_1(base_url, gguf_url):
    last = pull_lines(base_url, gguf_url)[-1]
    assert last["status"] == "error" and last["error"]["type"] == "pull_error"
    message = last["error"]["message"]
    assert "127.0.0.1 is a loopback address" in message
    assert "--pull-allow-host 127.0.0.1" in message and "--pull-allow-http" in message
    assert "x" not in listed(base_url)


def test_a_server_allowing_127_0_0_1_pulls_the_file_and_serves_it(
    tmp_path: Path, gguf_url: str
) -> None:
    args = ["--engine", "llama.cpp", "--pull-allow-http", "--pull-allow-host", "127.0.0.1"]
    with start_server(tmp_path, args, free_port()) as url:
        lines = pull_lines(url, gguf_url)
        assert lines[-1] == {"status": "success", "id": "x"}
        assert any(line["status"] == "downloading" and line["completed"] > 0 for line in lines)
        assert (tmp_path / "models" / "x.gguf").stat().st_size == embedded_gguf().stat().st_size
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert answer.model == "x" and answer.usage is not None
        assert answer.usage.completion_tokens > 0
