"""response_format through the official SDK, on every engine: the answer always parses, and
validates against the schema asked for."""

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.api_helpers import error_body
from tests.integration.conftest import MODEL
from tests.openai_schema import schema_errors, spec_available

ASK = [{"role": "user", "content": "Describe a cat named Tom who is 3 years old, as JSON."}]
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "species": {"type": "string", "enum": ["cat", "dog", "bird"]},
    },
    "required": ["name", "age", "species"],
    "additionalProperties": False,
}


def pet_format(strict: bool = True) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": strict},
    }


def test_json_schema_answer_validates(client):
    for seed in (1, 2, 3):
        response = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=120, seed=seed, response_format=pet_format()
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PET_SCHEMA)


def test_json_schema_streamed_answer_validates(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=120, seed=4, response_format=pet_format(),
        stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PET_SCHEMA)


def test_json_object_answers_are_json_objects(client):
    # An ask the small model answers briefly: "describe a cat as JSON" had it ramble inside a
    # string to max_tokens in 5 of 8 seeds, so that no answer of three was left to check.
    ask = [{"role": "user", "content": "Give a JSON object with two keys: name (Tom) and age (3)."}]
    finished = 0
    for seed in (1, 2, 3):
        response = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=200, seed=seed, temperature=0.7,
            response_format={"type": "json_object"},
        )  # fmt: skip
        choice = response.choices[0]
        # A small model may ramble inside a string until max_tokens; what it finished must parse.
        if choice.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    assert finished


class Pet(BaseModel):
    # Bounded fields, so that even a small model's answer ends well inside max_tokens.
    name: str = Field(max_length=12)
    species: Literal["cat", "dog", "bird"]


def test_sdk_parse_helper_returns_the_pydantic_object(client):
    # The SDK turns the pydantic model into a strict json_schema and parses the answer back.
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=120, seed=5, response_format=Pet
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet)


@pytest.mark.skipif(not spec_available(), reason="OpenAI spec not found (shared/)")
def test_structured_answer_matches_openai_schema(client):
    response = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=120, seed=6, response_format=pet_format()
    )
    assert schema_errors(json.loads(response.text), "CreateChatCompletionResponse") == []


def test_invalid_schema_is_refused_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8,
            response_format=pet_format() | {"json_schema": {"name": "pet", "schema": {"type": 7}}},
        )  # fmt: skip
    assert error_body(caught.value)["param"].startswith("response_format")


def test_numeric_bounds_are_enforced(client, engine):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3,
              "maximum": 7}}, "required": ["n"], "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    ask = [{"role": "user", "content": "Reply with JSON holding a number n, say 123456."}]
    for seed in (1, 2):
        response = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=30, seed=seed, response_format=response_format
        )
        jsonschema.validate(json.loads(response.choices[0].message.content), schema)
