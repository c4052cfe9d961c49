"""What real clients tripped on (the official SDKs, LangChain, the Vercel AI SDK, curl), each
pinned on the API layer: nulls that mean "the default", misleading messages, content that is
refused. The real engines' share (JSON bounds, whitespace, memory) is in tests/integration."""

from __future__ import annotations

import pytest

from tests.api_helpers import MODEL, assert_error, chat, make_client
from tests.scripted_engine import ScriptedEngine

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("nulls", [{"stream": None}, {"n": None}, {"stream": None, "n": None,
                                   "temperature": None, "stop": None, "seed": None}])  # fmt: skip
def test_nullable_chat_params_sent_as_null_mean_their_default(nulls):
    with make_client(ScriptedEngine("abc")) as client:
        response = chat(client, **nulls)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_nullable_completion_params_sent_as_null_mean_their_default():
    engine = ScriptedEngine("x" * 40)
    body = {"model": MODEL, "prompt": None, "echo": None, "n": None, "stream": None}
    with make_client(engine) as client:
        response = client.post("/v1/completions", json={**body, "max_tokens": None})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 16  # OpenAI's default
        assert engine.requests[-1].max_tokens == 16
        # A null prompt is the start of a new document: the model's BOS token.
        assert engine.requests[-1].prompt_tokens == tuple(ord(c) for c in "<s>")


def test_a_required_param_sent_as_null_is_still_refused_by_name():
    with make_client(ScriptedEngine()) as client:
        assert_error(chat(client, model=None), 400, "model")
        assert_error(chat(client, messages=None), 400, "messages")


def test_a_user_message_without_content_is_refused_an_assistant_one_with_calls_is_not():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with make_client(ScriptedEngine()) as client:
        error = assert_error(
            chat(client, messages=[{"role": "user", "content": None}]),
            400,
            "messages.[0].content",
        )
        assert "needs content" in error["message"]
        history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c1", "content": "42"}]  # fmt: skip
        assert chat(client, messages=history).status_code == 200


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ],
)
def test_images_and_audio_are_refused_as_such(part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}]
    with make_client(ScriptedEngine()) as client:
        error = assert_error(chat(client, messages=messages), 400, "messages.[0].content")
    assert f"text only: '{part['type']}'" in error["message"]


def test_an_empty_body_says_so_instead_of_naming_param_none():
    with make_client(ScriptedEngine()) as client:
        error = assert_error(client.post("/v1/chat/completions", content=b""), 400, None)
    assert "None" not in error["message"] and "JSON object" in error["message"]


def test_json_sent_as_a_form_like_curl_d_does_is_read_as_json():
    body = b'{"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}'
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with make_client(ScriptedEngine("ok")) as client:
        response = client.post("/v1/chat/completions", content=body, headers=form)
        assert response.status_code == 200, response.text
        assert_error(
            client.post("/v1/chat/completions", content=b"model=x", headers=form),
            400,
            None,
            "invalid_json",
        )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": ["ok", ""]}, "input.[1]"),
        ({"input": [[1, 2], []]}, "input.[1]"),
        ({"input": 3}, "input"),
    ],
)
def test_embedding_errors_name_the_input_not_pydantic_s_type_labels(body, param):
    with make_client(ScriptedEngine()) as client:
        response = client.post("/v1/embeddings", json={"model": MODEL, **body})
    error = assert_error(response, 400, param)
    assert "constrained" not in error["message"] and "[" not in (error["param"] or "")[:5]


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/nothing"), ("GET", "/v1"),
                                              ("GET", "/v2/models")])  # fmt: skip
def test_an_unknown_route_answers_in_openai_s_envelope(method, path):
    with make_client(ScriptedEngine()) as client:
        error = assert_error(client.request(method, path), 404, None)
    assert f"Invalid URL ({method} {path})" in error["message"]
