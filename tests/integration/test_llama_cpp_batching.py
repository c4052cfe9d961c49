"""llama.cpp's scheduler on a deliberately small server: 4 slots, a 2048-cell KV pool, 64-token
steps, so prefix reuse and waiting for KV room happen with short prompts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL, free_port, start_server

SMALL = ["--parallel", "4", "--kv-cache-tokens", "2048", "--ctx-size", "1024", "--batch-size", "64"]
SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: be brief and kind." for i in range(40)
)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    workdir: Path = tmp_path_factory.mktemp("small-llama-cpp")
    with start_server(workdir, ["--engine", "llama.cpp", *SMALL], free_port()) as url:
        yield url


def ask(url: str, user: str, **extra: object) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 24,
        "temperature": 0,
        **extra,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def reused(url: str, at_least: int = 0) -> int:
    """The engine's reuse counter; it reaches the server from the engine's process within a
    moment of a request ending, so wait (briefly) for the figure a test expects."""
    deadline = time.monotonic() + 5
    while True:
        value = int(httpx.get(f"{url}/health").json()["models"][0]["prefix_tokens_reused"])
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_shared_system_prompt_is_reused_and_answers_do_not_change(small_server):
    first = ask(small_server, "Name a colour.")
    assert first["usage"]["prompt_tokens"] > 128  # long enough to span whole 64-token chunks
    before = reused(small_server)
    second = ask(small_server, "Name a colour.")
    other = ask(small_server, "Name an animal.")
    assert reused(small_server, at_least=before + 2 * 64) - before >= 2 * 64
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert other["choices"][0]["message"]["content"]


def test_seeded_sampling_is_the_same_with_and_without_a_cached_prefix(small_server):
    texts = {
        ask(small_server, "Tell me a fact.", temperature=1.0, seed=42)["choices"][0]["message"][
            "content"
        ]
        for _ in range(3)
    }
    assert len(texts) == 1


def test_requests_beyond_the_kv_pool_wait_their_turn_instead_of_failing(small_server):
    # Each request reserves its prompt plus 500 tokens, so at most 2 of the 8 fit in the pool
    # at once: the rest must queue, and every one must still complete whole.
    def long_answer(i: int) -> dict:
        return ask(small_server, f"Write about topic {i}.", max_tokens=500, ignore_eos=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(long_answer, range(8)))
    for answer in answers:
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 500
