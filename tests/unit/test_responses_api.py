"""The Responses API on the scripted engine: shapes (validated against OpenAI's spec), the event
stream, the translation of input items, tools, text.format, stored responses and what is
refused. The real engines and the official SDK are in tests/integration/test_responses.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.api_helpers import MODEL, ReadyTestClient, assert_error, uvicorn_thread
from tests.openai_schema import schema_errors, spec_available
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.response_store import ResponseStore
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config

CONSTRAINED = frozenset({"response_format", "tool_choice"})
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
needs_spec = pytest.mark.skipif(not spec_available(), reason="OpenAI spec not found (shared/)")


def app_for(engine: ScriptedEngine, store: ResponseStore | None = None) -> Any:
    model = ServedModel(id=MODEL, engine=engine, limits=ServingLimits())
    registry = ModelRegistry([model])
    return create_app(api_config(Settings()), registry, response_store=store)


def client_for(engine: ScriptedEngine, store: ResponseStore | None = None) -> ReadyTestClient:
    return ReadyTestClient(app_for(engine, store), raise_server_exceptions=False)


def store_in(path: Path) -> ResponseStore:
    return ResponseStore(path / "responses.sqlite3", max_age_seconds=3600, max_rows=100)


def create(client: ReadyTestClient, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})


def events_of(response: Any) -> list[dict[str, Any]]:
    """The SSE events, each checked to carry its type as the event name too."""
    events = []
    for frame in filter(None, response.text.split("\n\n")):
        name, data = frame.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def prompt_of(engine: ScriptedEngine, index: int = -1) -> str:
    """The prompt the scripted engine was given (it tokenizes text as its characters)."""
    return "".join(chr(t) for t in engine.requests[index].prompt_tokens)


# --- answers -------------------------------------------------------------------------------


@needs_spec
def test_a_text_answer_is_a_completed_response_with_one_message():
    with client_for(ScriptedEngine("Hello there")) as client:
        body = create(client, instructions="Be brief.", metadata={"k": "v"}).json()
    assert schema_errors(body, "Response") == []
    assert body["id"].startswith("resp_") and len(body["id"]) > 40
    assert (body["status"], body["object"], body["model"]) == ("completed", "response", MODEL)
    (message,) = body["output"]
    assert (message["type"], message["role"], message["status"]) == (
        "message",
        "assistant",
        "completed",
    )
    assert message["content"] == [
        {"type": "output_text", "text": "Hello there", "annotations": [], "logprobs": []}
    ]
    usage = body["usage"]
    assert usage["output_tokens"] == len("Hello there") + 1  # the scripted end token too
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert (body["instructions"], body["metadata"]) == ("Be brief.", {"k": "v"})


@needs_spec
def test_the_stream_is_openai_s_events_in_order_and_ends_as_the_plain_answer():
    with client_for(ScriptedEngine("Hello there")) as client:
        events = events_of(create(client, stream=True))
    for event in events:
        assert schema_errors(event, "ResponseStreamEvent") == [], event["type"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "Hello there" and len(deltas) > 3
    assert events[0]["response"]["status"] == "in_progress"
    assert events[2]["item"]["content"] == [] and events[2]["item"]["status"] == "in_progress"
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello there"
    assert final["id"] == events[0]["response"]["id"]


def test_instructions_come_first_and_input_items_become_the_conversation():
    engine = ScriptedEngine("ok")
    items = [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "A1"}]},
        {"role": "user", "content": "Q2"},
    ]
    with client_for(engine) as client:
        assert create(client, instructions="Be kind.", input=items).status_code == 200
    assert prompt_of(engine) == (
        "<system>Be kind.\n<system>Rules.\n<user>Q1\n<assistant>A1\n<user>Q2\n<assistant>"
    )


def test_a_function_call_and_its_output_in_the_input_reach_the_model_in_its_format():
    engine = ScriptedEngine("It is sunny.", context_length=4096)
    items = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]  # fmt: skip
    with client_for(engine, None) as client:
        assert create(client, input=items, tools=[WEATHER]).status_code == 200
    prompt = prompt_of(engine)
    assert '"name": "get_weather"' in prompt  # the tools, described in the system prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


@needs_spec
def test_a_tool_call_is_a_function_call_item_streamed_name_first_then_arguments():
    with client_for(ScriptedEngine(CALL, context_length=4096)) as client:
        plain = create(client, tools=[WEATHER]).json()
        events = events_of(create(client, tools=[WEATHER], stream=True))
    assert schema_errors(plain, "Response") == []
    (call,) = plain["output"]
    assert (call["type"], call["name"]) == ("function_call", "get_weather")
    assert call["status"] == "completed"
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    assert json.loads(call["arguments"]) == {"city": "Oslo"}
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["name"] == "get_weather" and added["item"]["arguments"] == ""
    fragments = [
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    ]
    assert len(fragments) > 3
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"city": "Oslo"} == json.loads("".join(fragments))
    assert not [e for e in events if e["type"].startswith("response.output_text")]
    assert events[-1]["type"] == "response.completed"


def test_forced_tool_choice_and_text_format_reach_the_engine_as_json_constraints():
    engine = ScriptedEngine(
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
        supports=CONSTRAINED,
        context_length=4096,
    )
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    text_format = {"format": {"type": "json_schema", "name": "n", "schema": schema}}
    with client_for(engine) as client:
        forced = create(client, tools=[WEATHER], tool_choice="required").json()
        assert create(client, text=text_format).status_code == 200
        named = {"type": "function", "name": "get_weather"}
        assert create(client, tools=[WEATHER], tool_choice=named).status_code == 200
    assert forced["output"][0]["type"] == "function_call"
    assert forced["tool_choice"] == "required"
    first, second, third = (r.json_output for r in engine.requests)
    assert first is not None and first.param == "tool_choice"
    assert second is not None and second.param == "text.format"
    assert second.schema is not None and json.loads(second.schema) == schema
    assert third is not None and json.loads(third.schema or "")["properties"]["name"] == {
        "const": "get_weather"
    }


def test_an_engine_without_json_constraints_refuses_text_format_by_that_name():
    with client_for(ScriptedEngine()) as client:
        response = create(client, text={"format": {"type": "json_object"}})
    assert_error(response, 400, "text.format", "unsupported")


@needs_spec
def test_running_out_of_max_output_tokens_is_an_incomplete_response():
    with client_for(ScriptedEngine("x" * 40)) as client:
        plain = create(client, max_output_tokens=16).json()
        events = events_of(create(client, max_output_tokens=16, stream=True))
    assert schema_errors(plain, "Response") == []
    assert plain["status"] == "incomplete"
    assert plain["incomplete_details"] == {"reason": "max_output_tokens"}
    assert plain["output"][0]["status"] == "incomplete"
    assert plain["usage"]["output_tokens"] == 16
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_midway_ends_the_stream_with_response_failed():
    with client_for(ScriptedEngine("abcdefgh", fail_after=3)) as client:
        events = events_of(create(client, stream=True))
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error" and failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "abc"


# --- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools", "unsupported"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools", "unsupported"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "unsupported"),
        ({"background": True}, "background", "unsupported"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported"),
        ({"include": ["reasoning.encrypted_content"]}, "include", "unsupported"),
        ({"conversation": "conv_1"}, "conversation", "unsupported"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.[0].content",
            "unsupported",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.[0].type", None),
        ({"max_output_tokens": 8}, "max_output_tokens", "invalid_value"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", None),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"input": []}, "input", "invalid_value"),
        ({"previous_response_id": "resp_nothing"}, "previous_response_id", None),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(body, param, code):
    with client_for(ScriptedEngine(supports=CONSTRAINED, context_length=4096)) as client:
        response = create(client, **body)
    error = assert_error(response, 400, param, code)
    if param == "tools":
        assert "hosted by OpenAI" in error["message"]


def test_hosted_tools_are_named_in_the_refusal():
    with client_for(ScriptedEngine()) as client:
        error = create(client, tools=[WEATHER, {"type": "code_interpreter"}]).json()["error"]
    assert "code_interpreter" in error["message"]


# --- stored responses ----------------------------------------------------------------------


def test_stored_responses_are_retrieved_deleted_and_their_input_items_listed(tmp_path):
    items = [{"role": "user", "content": f"message {i}"} for i in range(5)]
    with client_for(ScriptedEngine("ok"), store_in(tmp_path)) as client:
        answer = create(client, input=items).json()
        rid = answer["id"]
        assert answer["store"] is True
        assert client.get(f"/v1/responses/{rid}").json() == answer
        page = client.get(f"/v1/responses/{rid}/input_items", params={"limit": 2}).json()
        assert [i["content"][0]["text"] for i in page["data"]] == ["message 4", "message 3"]
        assert page["has_more"] is True and page["first_id"] == page["data"][0]["id"]
        rest = client.get(
            f"/v1/responses/{rid}/input_items",
            params={"limit": 10, "after": page["last_id"]},
        ).json()
        assert [i["content"][0]["text"] for i in rest["data"]] == [
            "message 2",
            "message 1",
            "message 0",
        ]
        assert rest["has_more"] is False
        ascending = client.get(f"/v1/responses/{rid}/input_items", params={"order": "asc"})
        assert ascending.json()["data"][0]["content"][0]["text"] == "message 0"
        if spec_available():
            assert schema_errors(page, "ResponseItemList") == []
        deleted = client.delete(f"/v1/responses/{rid}")
        assert deleted.json() == {"id": rid, "object": "response.deleted", "deleted": True}
        assert_error(client.get(f"/v1/responses/{rid}"), 404, "response_id", "response_not_found")
        assert_error(client.delete(f"/v1/responses/{rid}"), 404, "response_id")


def test_store_false_and_a_server_without_a_store_keep_nothing(tmp_path):
    with client_for(ScriptedEngine("ok"), store_in(tmp_path)) as client:
        unstored = create(client, store=False).json()
        assert unstored["store"] is False
        assert client.get(f"/v1/responses/{unstored['id']}").status_code == 404
    with client_for(ScriptedEngine("ok")) as client:
        answer = create(client).json()
        assert answer["store"] is False
        assert client.get(f"/v1/responses/{answer['id']}").status_code == 404
        error = assert_error(
            create(client, previous_response_id=answer["id"]), 400, "previous_response_id"
        )
        assert "--responses-store none" in error["message"]


def test_previous_response_id_continues_the_conversation_without_its_instructions(tmp_path):
    engine = ScriptedEngine("Paris.")
    with client_for(engine, store_in(tmp_path)) as client:
        first = create(client, input="Capital of France?", instructions="Be terse.").json()
        second = create(client, input="And of Italy?", previous_response_id=first["id"])
        assert second.status_code == 200
        assert second.json()["previous_response_id"] == first["id"]
    assert prompt_of(engine) == (
        "<user>Capital of France?\n<assistant>Paris.\n<user>And of Italy?\n<assistant>"
    )


def test_a_tool_round_trip_through_previous_response_id(tmp_path):
    engine = ScriptedEngine(CALL, context_length=4096)
    with client_for(engine, store_in(tmp_path)) as client:
        first = create(client, input="Weather in Oslo?", tools=[WEATHER]).json()
        call = first["output"][0]
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
        engine.reply = "Sunny in Oslo."
        second = create(client, input=[output], tools=[WEATHER], previous_response_id=first["id"])
        assert second.json()["output"][0]["content"][0]["text"] == "Sunny in Oslo."
    prompt = prompt_of(engine)
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert prompt.index("Weather in Oslo?") < prompt.index(written)
    assert prompt.index(written) < prompt.index("<tool_response>\nsunny\n</tool_response>")


def test_stored_responses_outlive_the_store_object_and_age_out(tmp_path):
    with client_for(ScriptedEngine("ok"), store_in(tmp_path)) as client:
        rid = create(client).json()["id"]
    again = store_in(tmp_path)  # as after a restart: the same file, a new store
    with client_for(ScriptedEngine("ok"), again) as client:
        assert client.get(f"/v1/responses/{rid}").status_code == 200
    expired = ResponseStore(tmp_path / "responses.sqlite3", max_age_seconds=1e-9, max_rows=100)
    with client_for(ScriptedEngine("ok"), expired) as client:
        assert client.get(f"/v1/responses/{rid}").status_code == 404


def test_the_store_keeps_at_most_its_row_cap_dropping_the_oldest(tmp_path):
    capped = ResponseStore(tmp_path / "r.sqlite3", max_age_seconds=3600, max_rows=2)
    with client_for(ScriptedEngine("ok"), capped) as client:
        ids = [create(client).json()["id"] for _ in range(3)]
        assert [client.get(f"/v1/responses/{rid}").status_code for rid in ids] == [404, 200, 200]


def test_truncation_auto_drops_the_oldest_turns_to_fit_the_context():
    engine = ScriptedEngine("ok", context_length=120)
    history = [{"role": "user", "content": f"{'x' * 30} {i}"} for i in range(5)]
    with client_for(engine) as client:
        assert_error(create(client, input=history), 400, "messages", "context_length_exceeded")
        assert create(client, input=history, truncation="auto").status_code == 200
    prompt = prompt_of(engine)
    assert prompt.endswith(f"<user>{'x' * 30} 4\n<assistant>")
    assert f"{'x' * 30} 0" not in prompt


# --- the official SDK ------------------------------------------------------------------------


def test_the_official_sdk_creates_streams_retrieves_and_deletes(tmp_path):
    with uvicorn_thread(app_for(ScriptedEngine("Hello there"), store_in(tmp_path))) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        answer = sdk.responses.create(model=MODEL, input="hi")
        assert answer.output_text == "Hello there"
        with sdk.responses.stream(model=MODEL, input="hi") as stream:
            texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        assert "".join(texts) == final.output_text == "Hello there"
        assert sdk.responses.retrieve(answer.id).output_text == "Hello there"
        items = sdk.responses.input_items.list(answer.id)
        assert [item.type for item in items.data] == ["message"]
        sdk.responses.delete(answer.id)
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(answer.id)


class SlowStore(ResponseStore):
    """A store whose writes take a while, as a busy disk's do."""

    async def put(self, stored: Any) -> None:
        await asyncio.sleep(0.3)
        await super().put(stored)


def test_a_streamed_response_is_stored_before_the_event_saying_so(tmp_path):
    """A client may hang up as soon as it reads response.completed; what it was told is stored
    must already be."""
    store = SlowStore(tmp_path / "r.sqlite3", max_age_seconds=3600, max_rows=100)
    with uvicorn_thread(app_for(ScriptedEngine("Hello there"), store)) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for _ in range(3):
            stream = sdk.responses.create(model=MODEL, input="hi", stream=True)
            completed = next(e for e in stream if e.type == "response.completed")
            stream.close()  # at once, as an impatient client does
            assert sdk.responses.retrieve(completed.response.id).output_text == "Hello there"
