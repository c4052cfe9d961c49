"""Bad-input fuzzing against the real llama.cpp engine and embedding model: schemathesis
requests, valid and invalid, from the server's own OpenAPI schema; none may get a 5xx.
Completions are capped at 16 tokens (--max-tokens-limit) so the valid ones stay quick."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL, free_port, start_server

# Each route, with the model its requests are pointed at (or the model check stops them all).
PATHS = {
    "/v1/chat/completions": MODEL,
    "/v1/completions": MODEL,
    "/v1/embeddings": "all-minilm-l6-v2",
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
    assert 200 in statuses  # some requests were valid and really generated
    assert any(400 <= s < 500 for s in statuses)
