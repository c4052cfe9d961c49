"""logprobs, logit_bias and echo through the official SDK, on every engine."""

import json
import math

import httpx
import openai
import pytest

from tests.api_helpers import error_body
from tests.integration.conftest import MODEL
from tests.openai_schema import schema_errors, spec_available

SAY = [{"role": "user", "content": "Say hello."}]


def test_chat_logprobs_are_real_log_probabilities_of_the_text(client):
    response = client.chat.completions.create(
        model=MODEL, messages=SAY, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        alternatives = [top.logprob for top in entry.top_logprobs]
        assert len(alternatives) == 3
        assert alternatives == sorted(alternatives, reverse=True)
        assert sum(math.exp(lp) for lp in alternatives) <= 1.0001
        # Greedy decoding picks the most likely token (up to a near-tie in the engine's own
        # precision: vLLM on CPU computes in bfloat16).
        assert entry.logprob >= entry.top_logprobs[0].logprob - 0.05
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_streamed_chat_logprobs_follow_the_text(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=SAY, max_tokens=8, temperature=0, logprobs=True, stream=True
    )
    pieces, tokens = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            tokens += [entry.token for entry in chunk.choices[0].logprobs.content]
    assert "".join(tokens) == "".join(pieces)


def test_echo_with_logprobs_is_refused_naming_echo(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logprobs=1, echo=True)
    assert error_body(caught.value)["param"] == "echo"


def test_completion_logprobs_have_offsets_into_the_text(client):
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[0] == 0
    for i in range(1, len(logprobs.tokens)):
        assert logprobs.text_offset[i] == logprobs.text_offset[i - 1] + len(logprobs.tokens[i - 1])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_echo_returns_the_prompt_then_the_completion(client):
    prompt = "The capital of France is"
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                       echo=True)  # fmt: skip
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert echoed.choices[0].text == prompt + plain.choices[0].text


def biased_tokens(client, bias: dict[str, int]) -> list[str]:
    response = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=0,
        logit_bias=bias,
    )  # fmt: skip
    return response.choices[0].logprobs.tokens


def test_logit_bias_of_100_forces_a_token_and_minus_100_bans_it(client):
    a = biased_tokens(client, {"1000": 100})
    b = biased_tokens(client, {"1001": 100})
    assert len(set(a)) == 1 and len(set(b)) == 1 and a != b, (a, b)
    assert biased_tokens(client, {"1000": -100, "1001": 100}) == b
    assert biased_tokens(client, {"1000": 100, "1001": -100}) == a


def test_logprob_responses_match_openai_schema(base_url):
    if not spec_available():
        return
    chat = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": SAY, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
    })  # fmt: skip
    assert schema_errors(chat.json(), "CreateChatCompletionResponse") == []
    completion = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 4, "logprobs": 2,
    })  # fmt: skip
    assert schema_errors(completion.json(), "CreateCompletionResponse") == []
    events = []
    body = {"model": MODEL, "messages": SAY, "max_tokens": 4, "logprobs": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    for event in events[:-1]:
        assert schema_errors(json.loads(event), "CreateChatCompletionStreamResponse") == []
