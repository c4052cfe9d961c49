"""Function calling through the official SDK, on every engine."""

import json

import jsonschema
import pytest

from tests.integration.conftest import MODEL
from tests.openai_schema import schema_errors, spec_available

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20}},
                                          "required": ["city"], "additionalProperties": False}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_named_tool_choice_always_calls_it_with_valid_arguments(client):
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=120, seed=1
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_required_tool_choice_calls_one_of_the_tools(client):
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, seed=2,
        parallel_tool_calls=False,
    )  # fmt: skip
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name in {"get_weather", "get_time"}
    assert isinstance(json.loads(call.function.arguments), dict)


def test_streamed_tool_call_reassembles_into_the_same_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=120, seed=3,
        stream=True, parallel_tool_calls=False,
    )  # fmt: skip
    calls: dict[int, dict] = {}
    fragments = 0
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for part in choice.delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] = (part.function.name if part.function else None) or call["name"]
            if part.function and part.function.arguments:
                call["arguments"] += part.function.arguments
                fragments += 1
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls.values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_PARAMS)
    assert fragments > 3  # the arguments arrive as they are generated, not in one piece


def test_tool_results_in_the_history_get_an_answer(client):
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    ]  # fmt: skip
    response = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=24
    )
    choice = response.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in {"stop", "length"}


@pytest.mark.skipif(not spec_available(), reason="OpenAI spec not found (shared/)")
def test_tool_call_responses_match_openai_schema(client):
    for tool_choice in (NAMED, "auto"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=60
        )
        assert schema_errors(json.loads(raw.text), "CreateChatCompletionResponse") == []
