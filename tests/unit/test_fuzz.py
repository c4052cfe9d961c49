"""Bad-input fuzzing: schemathesis generates requests from our own OpenAPI schema, valid and
deliberately invalid, and every answer must be a 2xx or a 4xx in OpenAI's error envelope: never
a 5xx; on an open server and on one with keys (a user key, so admin routes are refused). The
API layer runs on the scripted engine here (thousands of requests in seconds);
tests/integration/test_fuzz_real.py sends a shorter run to the real llama.cpp engine."""

import asyncio

import schemathesis
from hypothesis import HealthCheck, settings

from tests.api_helpers import MODEL
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config

USER_KEY = "sk-fuzz"


def loaded_app(settings: Settings):
    """The app with its model already loaded: schemathesis calls it without running lifespan."""
    engine = ScriptedEngine(context_length=4096, max_running=64)
    model = ServedModel(id=MODEL, engine=engine, limits=ServingLimits(max_tokens=32))
    model.info = asyncio.run(engine.load())
    return create_app(api_config(settings), registry=ModelRegistry([model]))


def fuzzing_schema(settings: Settings, headers: dict[str, str] | None = None):
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", loaded_app(settings), headers=headers or {}
    )
    schema.config.generation.update(
        modes=schemathesis.GenerationMode.from_choice("all")  # positive and negative
    )
    return schema


open_schema = fuzzing_schema(Settings())
keyed_schema = fuzzing_schema(
    Settings(api_keys=[USER_KEY], admin_keys=["sk-admin"], rate_limit_requests="100000/min"),
    headers={"Authorization": f"Bearer {USER_KEY}"},
)


def check_no_server_error(case, headers=None):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # a served model, or generation would never be reached
    response = case.call(headers=headers)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    return response


@open_schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    check_no_server_error(case)


@keyed_schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_with_a_user_key_gets_a_server_error_nor_an_admin_route(case):
    response = check_no_server_error(case, headers={"Authorization": f"Bearer {USER_KEY}"})
    if case.path.startswith("/admin/"):
        assert response.status_code == 403, response.text
