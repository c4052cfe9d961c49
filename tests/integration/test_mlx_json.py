"""json_schema answers on the MLX engine end before max_tokens. Every value in the schema is
bounded, so only whitespace could run on. Asked for something the schema does not fit, at
temperature 2, the embedded model pads between items with tabs and newlines: under llguidance's
default whitespace it did so until max_tokens, 3 answers of 3; the constraint now bounds
whitespace as llama.cpp's grammars do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import OpenAI

from tests.integration.conftest import MODEL, free_port, start_server
from vllm_obtain.engines.registry import ENGINES

ASK = [{"role": "user", "content": "Translate 'good morning' into French."}]
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "species": {"type": "string", "enum": ["cat", "dog", "bird"]},
    },
    "required": ["name", "age", "species"],
    "additionalProperties": False,
}
# Room for the longest answer the schema allows (a name of 12 escaped characters included).
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def mlx_client(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    spec = ENGINES["mlx"]
    pytest.importorskip(spec.package, reason=f"mlx engine not installed: {spec.install_hint}")
    workdir: Path = tmp_path_factory.mktemp("mlx-json")
    args = ["--engine", "mlx", "--embedding-model", "none"]
    with start_server(workdir, args, free_port(), cache_dir=shared_cache) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_answer_ends_and_validates(mlx_client, seed):
    response = mlx_client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, seed=seed, temperature=2.0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "pet", "schema": PET, "strict": True}},
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "stop", repr(choice.message.content)
    jsonschema.validate(json.loads(choice.message.content or ""), PET)
