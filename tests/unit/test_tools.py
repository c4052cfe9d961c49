"""Function calling: prompts with tools, tool calls read out of the text, their OpenAI shapes
(scripted engine: it replies with the text given, so the parsing is pinned exactly)."""

import json

import pytest

from tests.api_helpers import chat, make_client, sse_events
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.core.tool_stream import (
    CallEvent,
    ForcedCallReader,
    JsonValueScanner,
    TaggedCallReader,
    assemble,
)
from vllm_obtain.core.tools import forced_call_schema, messages_with_tools, template_renders_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CONSTRAINED = frozenset({"tool_choice", "response_format"})


def scripted(reply: str = "Hello", **options) -> ScriptedEngine:
    return ScriptedEngine(reply, context_length=4096, **options)  # room for the tools prompt


def read_all(reader, text: str, step: int) -> tuple[str, list[CallEvent]]:
    content, events = "", list[CallEvent]()
    for i in range(0, len(text), step):
        piece, found = reader.feed(text[i : i + step])
        content, events = content + piece, events + found
    rest, found = reader.finish()
    return content + rest, events + found


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_tagged_calls_are_cut_out_of_the_text_however_it_is_streamed(step):
    content, events = read_all(TaggedCallReader(), f"Let me check.{CALL}{CALL}", step)
    assert content == "Let me check."
    calls = assemble(events)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Paris"}),
    ]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_a_call_streams_its_name_first_then_its_arguments_in_pieces():
    _, events = read_all(TaggedCallReader(), CALL, 2)
    assert events[0].call_id and events[0].name == "get_weather" and events[0].position == 0
    fragments = [e.arguments for e in events[1:]]
    assert len(fragments) > 3 and "".join(fragments) == '{"city": "Paris"}'


def test_a_block_that_is_not_a_call_stays_text_and_an_unclosed_call_still_counts():
    bad = "<tool_call>not json</tool_call>"
    assert read_all(TaggedCallReader(), bad, 2) == (bad, [])
    content, events = read_all(TaggedCallReader(), '<tool_call>{"name": "f", "arguments": {}}', 4)
    (call,) = assemble(events)
    assert content == "" and call.name == "f" and call.arguments == "{}"
    assert read_all(TaggedCallReader(), "a < b <tool", 1) == ("a < b <tool", [])


def test_a_call_written_arguments_first_is_read_whole_when_it_closes():
    text = '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'
    _, events = read_all(TaggedCallReader(), text, 5)
    (call,) = assemble(events)
    assert call.name == "f" and json.loads(call.arguments) == {"x": 1}


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_forced_answers_stream_each_call_of_a_list(step):
    text = ('[{"name": "get_weather", "arguments": {"city": "Oslo, \\"NO\\"}"}},'
            ' {"name": "get_time", "arguments": {"tz": [1, {"a": "}"}]}}]')  # fmt: skip
    reader = ForcedCallReader()
    content, events = read_all(reader, text, step)
    calls = assemble(events)
    assert content == "" and reader.calls == 2
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": 'Oslo, "NO"}'}
    assert json.loads(calls[1].arguments) == {"tz": [1, {"a": "}"}]}


def test_a_forced_answer_cut_short_is_given_back_as_text():
    reader = ForcedCallReader()
    content, events = read_all(reader, '{"arguments": {"ci', 4)
    assert content == '{"arguments": {"ci' and events == [] and reader.calls == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [('{"a": "}"} tail', '{"a": "}"}'), ("[1, [2]] x", "[1, [2]]"), ("12, ", "12"),
     ('"s\\"" ', '"s\\""'), ("true}", "true")],
)  # fmt: skip
def test_the_scanner_finds_where_a_json_value_ends(text, value):
    scanner = JsonValueScanner()
    used = sum(scanner.scan(char) for char in text)  # one character at a time
    assert scanner.done and text[:used] == value


def test_templates_without_tools_get_them_in_the_system_prompt():
    assert template_renders_tools("{% if tools %}{{ tools }}{% endif %}")
    assert not template_renders_tools("{{ messages }}")
    messages = messages_with_tools([{"role": "user", "content": "hi"}], [WEATHER])
    assert messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    history = messages_with_tools(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        ],
        [WEATHER],
    )
    assert history[0]["content"].startswith("Be brief.")
    assert '<tool_call>\n{"name": "get_weather"' in history[1]["content"]
    assert history[2] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}


def test_forced_call_schema_is_a_list_of_calls_of_the_named_tool():
    schema = forced_call_schema([WEATHER], "get_weather", parallel=True)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 8
    assert schema["items"]["properties"]["name"] == {"const": "get_weather"}
    single = forced_call_schema([WEATHER, WEATHER], None, parallel=False)
    assert len(single["anyOf"]) == 2


def test_tool_call_answer_has_tool_calls_and_finish_reason_tool_calls():
    with make_client(scripted(f"Checking.{CALL}")) as client:
        body = chat(client, tools=[WEATHER]).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_streamed_tool_call_sends_name_then_arguments_then_finish():
    with make_client(scripted(CALL)) as client:
        events = sse_events(chat(client, tools=[WEATHER], stream=True))
    deltas = [e["choices"][0]["delta"] for e in events]
    parts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert parts[0]["index"] == 0 and parts[0]["function"] == {
        "name": "get_weather",
        "arguments": "",
    }
    assert parts[0]["id"].startswith("call_") and parts[0]["type"] == "function"
    arguments = "".join(p["function"]["arguments"] for p in parts)
    assert json.loads(arguments) == {"city": "Paris"}
    assert not any(d.get("content") for d in deltas)  # the markup never leaks as content
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_offers_no_tools_and_reads_no_calls():
    engine = scripted(CALL)
    with make_client(engine) as client:
        body = chat(client, tools=[WEATHER], tool_choice="none").json()
    assert body["choices"][0]["message"]["content"] == CALL
    assert "get_weather" not in "".join(chr(t) for t in engine.requests[0].prompt_tokens)


def test_required_tool_choice_constrains_the_output_and_reads_the_json_calls():
    engine = scripted(
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', supports=CONSTRAINED
    )
    with make_client(engine) as client:
        body = chat(client, tools=[WEATHER], tool_choice="required").json()
    json_output = engine.requests[0].json_output
    assert json_output is not None and json_output.schema is not None
    assert json_output.param == "tool_choice"
    assert json.loads(json_output.schema)["type"] == "array"
    choice = body["choices"][0]
    assert choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Oslo"
    }


def test_tools_reach_the_template_and_history_with_calls_is_accepted():
    engine = scripted("It is 18C.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]  # fmt: skip
    with make_client(engine) as client:
        body = chat(client, messages=messages, tools=[WEATHER]).json()
    assert body["choices"][0]["message"]["content"] == "It is 18C."
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = "".join(chr(t) for t in engine.requests[0].prompt_tokens)
    assert "<tool_response>\n18C\n</tool_response>" in prompt and "get_weather" in prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
         "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_param(body, param):
    with make_client(scripted(supports=CONSTRAINED)) as client:
        response = chat(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)
