"""llama.cpp's scheduler on deliberately small servers: 4 slots, 64-token steps, and either one
2048-cell KV pool (the default layout, where waiting for KV room and preemption happen with
short prompts) or 1024 cells per slot (--no-kv-unified), so prefix reuse happens with short
prompts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL, free_port, start_server

SMALL = ["--parallel", "4", "--ctx-size", "1024", "--batch-size", "64"]
LAYOUTS = {
    "unified": [*SMALL, "--kv-cache-tokens", "2048"],
    "split": [*SMALL, "--kv-cache-tokens", "4096", "--no-kv-unified"],
}
SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: be brief and kind." for i in range(40)
)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def small_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    workdir: Path = tmp_path_factory.mktemp(f"small-llama-cpp-{request.param}")
    args = ["--engine", "llama.cpp", *LAYOUTS[request.param]]
    with start_server(workdir, args, free_port()) as url:
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
    # Each request reserves its prompt plus 500 tokens, so at most 2 of the 8 fit in the unified
    # pool at once, and 4 run in the 4 split slots: the rest must queue, and every one must
    # still complete whole.
    def long_answer(i: int) -> dict:
        return ask(small_server, f"Write about topic {i}.", max_tokens=500, ignore_eos=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(long_answer, range(8)))
    for answer in answers:
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 500


def chat(url: str, messages: list[dict], **extra: object) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_chat_history_sent_again_with_one_more_message_reuses_every_cached_token(small_server):
    """What chat front-ends do every turn: the whole history again, plus the new message."""
    history = [
        {"role": "system", "content": "You answer in one short sentence. " * 8},
        {"role": "user", "content": "Name a colour."},
    ]
    first = chat(small_server, history)
    before = reused(small_server)
    history += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And one more?"},
    ]
    second = chat(small_server, history)
    gained = reused(small_server, at_least=before + first["usage"]["prompt_tokens"]) - before
    # All of the first prompt (not cut to whole 64-token chunks), and the answer after it.
    assert gained >= first["usage"]["prompt_tokens"]
    assert gained < second["usage"]["prompt_tokens"]  # the new message is evaluated
    assert second["choices"][0]["message"]["content"]


def test_a_prefix_held_by_a_running_request_is_copied_to_a_new_one_without_cross_talk(
    small_server,
):
    # A system prompt no other test uses: only the running request's slot holds it.
    system = "You are a lighthouse keeper's assistant. " + " ".join(
        f"Note {i}: the lamp is lit at dusk." for i in range(20)
    )

    def messages(user: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    # Computed fresh: no slot holds this system prompt yet. The long request below then takes
    # this slot (it shares the system prompt), and the same question beside it gets the
    # system prompt copied from it.
    alone = chat(small_server, messages("Name an animal."))
    long_body = {
        "model": MODEL,
        "messages": messages("Describe the lighthouse."),
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(timeout=300) as client,
        client.stream("POST", f"{small_server}/v1/chat/completions", json=long_body) as running,
    ):
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is decoding now
        before = reused(small_server)
        beside = chat(small_server, messages("Name an animal."))
        gained = reused(small_server, at_least=before + 128) - before
        for _ in lines:  # the long answer runs to its end, whole
            pass
    assert gained >= 128  # the system prompt, copied from the running request's slot
    # A wrong copy (other cells, other positions) derails the answer from its first words.
    # Later words may differ: computed beside another sequence (split slots even cut its
    # prompt into other pieces), a near-tie can round the other way (see the README).
    beside_words = beside["choices"][0]["message"]["content"].split()
    assert beside_words[:5] == alone["choices"][0]["message"]["content"].split()[:5]
