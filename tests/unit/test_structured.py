"""response_format on the API layer: what reaches the engine, and what is refused (400, named).
That the output really is valid JSON is tested on the real engines in integration/."""

import json

import pytest

from tests.api_helpers import assert_error, chat, make_client
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.contract import EngineRequestError, JsonOutput

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def json_schema_format(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def run(engine: ScriptedEngine, **body):
    with make_client(engine) as client:
        return chat(client, **body)


def test_json_schema_reaches_the_engine_as_json_text_in_its_own_order():
    engine = ScriptedEngine(supports=frozenset({"response_format"}))
    assert run(engine, response_format=json_schema_format(SCHEMA)).status_code == 200
    assert engine.requests[0].json_output == JsonOutput(json.dumps(SCHEMA))


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "any"}}],
)
def test_json_object_or_a_schemaless_json_schema_asks_for_any_json(response_format):
    engine = ScriptedEngine(supports=frozenset({"response_format"}))
    assert run(engine, response_format=response_format).status_code == 200
    assert engine.requests[0].json_output == JsonOutput(schema=None)


def test_text_format_is_no_constraint():
    engine = ScriptedEngine()
    assert run(engine, response_format={"type": "text"}).status_code == 200
    assert engine.requests[0].json_output is None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema"},  # no json_schema
        {"type": "xml"},
        json_schema_format({"type": "no-such-type"}),
        json_schema_format({"properties": {"n": {"minimum": "zero"}}}),
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}},
    ],
)
def test_malformed_response_format_is_400_naming_it(response_format):
    engine = ScriptedEngine(supports=frozenset({"response_format"}))
    response = run(engine, response_format=response_format)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("response_format")
    assert engine.requests == []


def test_engine_without_constrained_decoding_refuses_by_name():
    response = run(ScriptedEngine(), response_format={"type": "json_object"})
    assert_error(response, 400, "response_format", "unsupported")


@pytest.mark.parametrize("stream", [False, True])
def test_schema_the_engine_cannot_compile_is_400_not_500(stream):
    refusal = EngineRequestError("cannot build a grammar", param="response_format")
    engine = ScriptedEngine(supports=frozenset({"response_format"}), refuse=refusal)
    response = run(engine, response_format=json_schema_format(SCHEMA), stream=stream)
    assert_error(response, 400, "response_format", "unsupported")
