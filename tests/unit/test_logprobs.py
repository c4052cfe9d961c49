"""logprobs, top_logprobs, logit_bias and echo on the API layer (scripted engine: each
character is a token with logprob -1.0 and alternatives "a", "b", ... at -2, -3, ...)."""

import pytest

from tests.api_helpers import MODEL, assert_error, chat, make_client, sse_events
from tests.scripted_engine import ScriptedEngine

FULL = frozenset({"logprobs", "logit_bias"})


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine("Hi there", supports=FULL)


@pytest.fixture
def client(engine):
    with make_client(engine) as client:
        yield client


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "Say", **body})


def test_chat_logprobs_cover_every_token_with_top_alternatives(client):
    choice = chat(client, logprobs=True, top_logprobs=2).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    assert content[0] == {
        "token": "H",
        "logprob": -1.0,
        "bytes": [72],
        "top_logprobs": [
            {"token": "a", "logprob": -2.0, "bytes": [97]},
            {"token": "b", "logprob": -3.0, "bytes": [98]},
        ],
    }


def test_chat_without_logprobs_has_null_logprobs(client, engine):
    assert chat(client).json()["choices"][0]["logprobs"] is None
    assert engine.requests[0].logprobs is None


def test_streamed_chat_chunks_carry_the_logprobs_of_their_text(client):
    response = chat(client, logprobs=True, stream=True)
    chunks = [e["choices"][0] for e in sse_events(response) if e["choices"]]
    with_text = [c for c in chunks if c["delta"].get("content")]
    assert with_text
    for chunk in with_text:
        tokens = "".join(entry["token"] for entry in chunk["logprobs"]["content"])
        assert tokens == chunk["delta"]["content"]
        assert all(entry["top_logprobs"] == [] for entry in chunk["logprobs"]["content"])


def test_top_logprobs_without_logprobs_is_400_naming_it(client):
    assert_error(chat(client, top_logprobs=2), 400, "top_logprobs")
    assert_error(chat(client, logprobs=True, top_logprobs=21), 400, "top_logprobs")


def test_completion_logprobs_are_parallel_arrays_with_text_offsets(client):
    choice = complete(client, logprobs=1, max_tokens=3).json()["choices"][0]
    assert choice["text"] == "Hi "
    assert choice["logprobs"] == {
        "tokens": ["H", "i", " "],
        "token_logprobs": [-1.0, -1.0, -1.0],
        "top_logprobs": [{"a": -2.0}, {"a": -2.0}, {"a": -2.0}],
        "text_offset": [0, 1, 2],
    }


def test_echo_puts_the_prompt_before_the_text_and_offsets_after_it(client):
    choice = complete(client, echo=True, max_tokens=2).json()["choices"][0]
    assert choice["text"] == "SayHi"
    streamed = complete(client, echo=True, max_tokens=2, stream=True)
    assert "".join(e["choices"][0]["text"] for e in sse_events(streamed) if e["choices"]) == "SayHi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),  # would need the prompt's logprobs
        ({"echo": True, "prompt": [1, 2, 3]}, "echo"),  # no text to echo
        ({"logprobs": 6}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
    ],
)
def test_completion_combinations_we_cannot_honour_are_400_naming_the_param(client, body, param):
    assert_error(complete(client, **body), 400, param)


def test_logit_bias_reaches_the_engine_as_token_id_pairs(client, engine):
    assert chat(client, logit_bias={"72": -100, "5": 2.5}).status_code == 200
    assert engine.requests[0].sampling.logit_bias == ((5, 2.5), (72, -100.0))


@pytest.mark.parametrize(
    "bias", [{"hello": 1}, {"72": 101}, {"72": -100.5}, {str(0x110000): 1}, {"-1": 1}]
)
def test_bad_logit_bias_is_400_naming_it(client, bias):
    response = chat(client, logit_bias=bias)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("logit_bias")


@pytest.mark.parametrize(("body", "param"), [({"logprobs": True}, "logprobs"),
                                             ({"logit_bias": {"1": 1}}, "logit_bias")])  # fmt: skip
def test_engine_without_them_refuses_logprobs_and_logit_bias_by_name(body, param):
    with make_client(ScriptedEngine()) as client:
        assert_error(chat(client, **body), 400, param, "unsupported")
