"""The Responses API through the official SDK (and LangChain), on every engine, with the real
model; every response and stream event checked against OpenAI's spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.integration.conftest import MODEL, free_port, start_server
from tests.openai_schema import schema_errors, spec_available

# Typed loosely: the SDK's TypedDicts would want each literal spelt as one of ~30 param types.
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
# The same tool as Chat Completions spell it (LangChain's bind_tools takes that form).
WEATHER_FOR_CHAT = {
    "type": "function",
    "function": {k: WEATHER[k] for k in ("name", "description", "parameters")},
}
ANIMAL: Any = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "legs": {"type": "integer"}},
    "required": ["name", "legs"],
    "additionalProperties": False,
}
needs_spec = pytest.mark.skipif(not spec_available(), reason="OpenAI spec not found (shared/)")


def raw_events(base_url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed response's events as sent (the SDK fills in defaults when it parses)."""
    with httpx.stream("POST", f"{base_url}/v1/responses", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line.removeprefix("data: ")) for line in lines]


@needs_spec
def test_a_response_is_openai_s_response_with_the_model_s_text(base_url: str, client: OpenAI):
    response = client.responses.create(
        model=MODEL, input="Name a colour.", instructions="Answer in one word.",
        max_output_tokens=24, temperature=0,
    )  # fmt: skip
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    raw = httpx.get(f"{base_url}/v1/responses/{response.id}", timeout=30).json()
    assert schema_errors(raw, "Response") == []
    assert raw["output"][0]["content"][0]["text"] == response.output_text


@needs_spec
def test_the_stream_s_events_validate_and_add_up_to_the_answer(base_url: str, client: OpenAI):
    events = raw_events(base_url, {"model": MODEL, "input": "Say hello.", "stream": True,
                                   "max_output_tokens": 24, "temperature": 0})  # fmt: skip
    for event in events:
        assert schema_errors(event, "ResponseStreamEvent") == [], event["type"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas and deltas == final["output"][0]["content"][0]["text"]
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=24) as stream:
        parsed = list(stream)  # the SDK's own reading of the events
    texts = [e.delta for e in parsed if e.type == "response.output_text.delta"]
    last = parsed[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert "".join(texts) == last.response.output_text


def test_stored_responses_are_retrieved_listed_and_deleted(client: OpenAI):
    message: Any = {"role": "user", "content": [{"type": "input_text", "text": "Hi there."}]}
    response = client.responses.create(
        model=MODEL, input=[message], max_output_tokens=16, metadata={"test": "stored"}
    )
    again = client.responses.retrieve(response.id)
    assert (again.output_text, again.metadata) == (response.output_text, {"test": "stored"})
    items = client.responses.input_items.list(response.id).model_dump()["data"]
    assert [(i["type"], i["content"][0]["text"]) for i in items] == [("message", "Hi there.")]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_a_function_call_round_trip_through_previous_response_id(client: OpenAI):
    named: Any = {"type": "function", "name": "get_weather"}
    first = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER], tool_choice=named,
        max_output_tokens=64,
    )  # fmt: skip
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    result: Any = {"type": "function_call_output", "call_id": call.call_id,
                   "output": '{"temperature": "21 C", "sky": "clear"}'}  # fmt: skip
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=[result], tools=[WEATHER],
        tool_choice="none", max_output_tokens=48,
    )  # fmt: skip
    assert second.previous_response_id == first.id
    assert [item.type for item in second.output] == ["message"]
    assert second.output_text.strip()


def test_text_format_json_schema_is_enforced(client: OpenAI):
    response = client.responses.create(
        model=MODEL, input="Describe an animal as JSON.", max_output_tokens=64, temperature=0,
        text={"format": {"type": "json_schema", "name": "animal", "schema": ANIMAL,
                         "strict": True}},
    )  # fmt: skip
    assert response.status == "completed", response.output_text
    jsonschema.validate(json.loads(response.output_text), ANIMAL)


def test_max_output_tokens_ends_an_answer_as_incomplete(client: OpenAI):
    # Greedy: a sampled answer may end (EOS) before 16 tokens, and the test would then be luck.
    response = client.responses.create(
        model=MODEL, input="Tell me a long story about the sea.", max_output_tokens=16,
        temperature=0,
    )  # fmt: skip
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 16


def test_hosted_tools_are_refused_by_name(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="news?", tools=[{"type": "web_search"}])
    assert caught.value.body is not None
    body: Any = caught.value.body
    assert body["param"] == "tools" and "web_search" in body["message"]


def test_langchain_responses_round_trip_with_a_tool(base_url: str):
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    messages = pytest.importorskip("langchain_core.messages")
    llm = chat_openai(
        model=MODEL, base_url=f"{base_url}/v1", api_key="unused", use_responses_api=True,
        max_retries=0, max_tokens=64, temperature=0,
    )  # fmt: skip
    ask = messages.HumanMessage("What is the weather in Oslo?")
    called = llm.bind_tools([WEATHER_FOR_CHAT], tool_choice="get_weather").invoke([ask])
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    result = messages.ToolMessage('{"sky": "clear"}', tool_call_id=call["id"])
    answer = llm.bind_tools([WEATHER_FOR_CHAT], tool_choice="none").invoke([ask, called, result])
    assert answer.text.strip() and not answer.tool_calls


def test_stored_responses_outlive_a_restart(tmp_path: Path):
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    args, cache = ["--engine", "llama.cpp", "--embedding-model", "none"], tmp_path / "cache"
    with start_server(tmp_path, args, free_port(), cache_dir=cache) as url:
        sdk = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        first = sdk.responses.create(model=MODEL, input="Hello!", max_output_tokens=16)
    assert (cache / "responses.sqlite3").is_file()
    with start_server(tmp_path, args, free_port(), cache_dir=cache) as url:
        sdk = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert sdk.responses.retrieve(first.id).output_text == first.output_text
        follow_up = sdk.responses.create(
            model=MODEL, input="And again?", previous_response_id=first.id, max_output_tokens=16
        )
        assert follow_up.previous_response_id == first.id
