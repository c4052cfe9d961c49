"""Bad-input fuzzing against the real llama.cpp engine and embedding model: schemathesis
requests, valid and invalid, from the server's own OpenAPI schema; none may get a 5xx.
Completions are capped at 16 tokens (--max-tokens-limit) so the valid ones stay quick."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL, free_port, start_server

# Each route, with the model its requests are pointed at (or the model check stops them all).
PATHS = {
    "/v1/chat/completions": MODEL,
    "/v1/completions": MODEL,
    "/v1/responses": MODEL,
    "/v1/embeddings": "all-minilm-l6-v2",
}
# A plainly valid body per route: sent beside the generated ones, so that a valid request is
# always among them (generated ones are valid only by chance: a few in 60, sometimes none).
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 4},
    "/v1/responses": {"input": "Hi", "max_output_tokens": 16},
    "/v1/embeddings": {"input": "a sentence"},
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    args = ["--engine", "llama.cpp", "--parallel", "4", "--max-tokens-limit", "16"]
    with start_server(workdir, args, free_port()) as base_url:
        yield base_url


@pytest.mark.parametrize("path", list(PATHS))
def test_no_request_to_the_real_engine_gets_a_server_error(url, path):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operation = schema[path]["POST"]
    modes = schemathesis.GenerationMode.from_choice("all")  # positive and negative
    cases = st.one_of(*(operation.as_strategy(mode) for mode in modes))
    statuses: list[int] = []

    @given(cases)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    def no_server_error(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = PATHS[path]
        response = case.call(timeout=120)
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{case.path}: {response.text[:500]}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    no_server_error()
    valid = operation.Case(body={"model": PATHS[path], **VALID[path]})
    response = valid.call(timeout=120)
    assert response.status_code == 200, response.text[:500]  # and still serves after the fuzz
    assert any(400 <= s < 500 for s in statuses)
