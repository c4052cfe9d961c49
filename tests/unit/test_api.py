"""API-layer behaviour pinned on the scripted engine: envelopes, framing, failures, cancellation.
What the model itself says is tested on the real engine in tests/integration."""

import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import (
    MODEL,
    ReadyTestClient,
    assert_error,
    chat,
    make_client,
    sse_events,
    uvicorn_thread,
)
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.served_model import ServedModel
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    with make_client(engine) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"model": 7}, "model"),
    ],
)
def test_out_of_range_and_wrong_typed_params_are_400_naming_the_param(client, body, param):
    assert_error(chat(client, **body), 400, param)


def test_missing_required_field_is_400_naming_it(client):
    response = client.post("/v1/chat/completions", json={"model": MODEL})
    error = assert_error(response, 400, "messages")
    assert "Missing required parameter" in error["message"]


def test_malformed_json_is_400(client):
    response = client.post(
        "/v1/chat/completions",
        content=b'{"model": "x", bad',
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 400, None, "invalid_json")


def test_unknown_model_is_404_model_not_found(client):
    assert_error(chat(client, model="gpt-9"), 404, "model", "model_not_found")
    assert_error(client.get("/v1/models/gpt-9"), 404, "model", "model_not_found")


def test_unknown_route_is_an_openai_envelope(client):
    assert_error(client.get("/v1/nothing"), 404, None)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
            "tool_choice",
        ),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_features_the_engine_lacks_are_refused_by_name_not_ignored(client, body, param):
    assert_error(chat(client, **body), 400, param, "unsupported")


def test_sampling_param_the_engine_lacks_is_refused_by_name(client):
    assert_error(chat(client, presence_penalty=0.5), 400, "presence_penalty", "unsupported")
    assert chat(client, temperature=0.5, top_p=0.9, seed=1).status_code == 200


def test_prompt_longer_than_context_is_400(client):
    error = assert_error(
        chat(client, messages=[{"role": "user", "content": "x" * 1000}]),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert "maximum context length is 256" in error["message"]


def test_image_content_parts_are_refused(client):
    content = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    response = chat(client, messages=[{"role": "user", "content": content}])
    assert response.status_code == 400


def test_text_content_parts_are_joined(client, engine):
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat(client, messages=[{"role": "user", "content": content}]).status_code == 200
    prompt = "".join(chr(t) for t in engine.requests[-1].prompt_tokens)
    assert prompt == "<user>ab\n<assistant>"


def test_chat_template_override_replaces_the_models_own(engine):
    model = ServedModel(id=MODEL, engine=engine, chat_template="[{{ messages[0].content }}]")
    with ReadyTestClient(
        create_app(api_config(Settings()), registry=ModelRegistry([model]))
    ) as client:
        assert chat(client).status_code == 200
    assert "".join(chr(t) for t in engine.requests[-1].prompt_tokens) == "[hi]"


def test_developer_role_is_rendered_as_system(client, engine):
    chat(client, messages=[{"role": "developer", "content": "rules"}])
    assert "".join(chr(t) for t in engine.requests[-1].prompt_tokens).startswith("<system>rules")


def test_token_id_prompt_out_of_vocabulary_is_400(client):
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 0x110000], "max_tokens": 2}
    )
    assert_error(response, 400, "prompt")


def test_engine_failure_is_a_500_envelope_and_the_server_goes_on():
    engine = ScriptedEngine(fail_after=0)
    with make_client(engine) as client:
        assert_error(chat(client), 500, None, "engine_error")
        engine.fail_after = None
        assert chat(client).status_code == 200


def test_engine_failure_before_the_first_token_of_a_stream_is_a_plain_500():
    with make_client(ScriptedEngine(fail_after=0)) as client:
        assert_error(chat(client, stream=True), 500, None, "engine_error")


def test_engine_failure_mid_stream_ends_with_an_error_event_then_done():
    with make_client(ScriptedEngine(fail_after=3)) as client:
        response = chat(client, stream=True)
        assert response.status_code == 200
        events = sse_events(response)
        assert events[-1]["error"]["code"] == "engine_error"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hel"


def test_stream_framing_role_first_one_finish_then_usage(client):
    events = sse_events(chat(client, stream=True, stream_options={"include_usage": True}))
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["stop"]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == len("Hello there, world!") + 1
    assert all("usage" not in e for e in events[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    events = sse_events(chat(client, stream=True))
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events)


def test_stop_string_cuts_text_and_cancels_generation(client, engine):
    body = chat(client, stop=["there"]).json()
    assert body["choices"][0]["message"]["content"] == "Hello "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert engine.cancelled == 1


def test_n_choices_each_have_their_own_index_and_seed(client, engine):
    body = chat(client, n=3, seed=7).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(r.sampling.seed for r in engine.requests) == [7, 8, 9]
    assert body["usage"]["completion_tokens"] == 3 * (len("Hello there, world!") + 1)


def test_max_tokens_gives_length(client):
    body = chat(client, max_tokens=4).json()
    assert body["choices"][0]["message"]["content"] == "Hell"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}


def test_completions_multiple_prompts_index_prompt_major(client):
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2}
    )
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 2


def test_completions_refuse_suffix_and_echo_with_logprobs_by_name(client):
    for extra, param in (({"echo": True, "logprobs": 0}, "echo"), ({"suffix": "x"}, "suffix")):
        response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", **extra})
        assert_error(response, 400, param, "unsupported")


def test_request_id_is_honoured_and_returned(client):
    response = client.get("/v1/models", headers={"X-Request-ID": "req-123"})
    assert response.headers["x-request-id"] == "req-123"
    assert client.get("/v1/models").headers["x-request-id"]


def test_health_reports_engine_state(client):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["models"] == [
        {"id": MODEL, "engine": "scripted", "state": "ready", "running": 0, "waiting": 0}
    ]


def test_client_leaving_a_stream_cancels_the_generation():
    """Over real HTTP (uvicorn): TestClient does not deliver disconnects to the app."""
    engine = ScriptedEngine(endless=True)
    registry = ModelRegistry([ServedModel(id=MODEL, engine=engine)])
    with uvicorn_thread(create_app(api_config(Settings()), registry=registry)) as base_url:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload) as response:
            for _ in zip(range(5), response.iter_lines(), strict=False):
                pass
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == 0
        assert engine.cancelled == 1


def test_client_leaving_before_a_plain_answer_cancels_the_generation():
    engine = ScriptedEngine(endless=True)
    registry = ModelRegistry([ServedModel(id=MODEL, engine=engine)])
    with uvicorn_thread(create_app(api_config(Settings()), registry=registry)) as base_url:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == 0
        assert engine.cancelled == 1
