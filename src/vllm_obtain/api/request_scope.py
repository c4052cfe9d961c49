"""What a route reads from its app and its request: the models it names, its log and metrics
record, and the measured stream of its answer."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import Request

from vllm_obtain.api.errors import InvalidRequestError
from vllm_obtain.api.metrics import RequestRecord, ServerMetrics
from vllm_obtain.api.middleware import ON_RESPONSE_END
from vllm_obtain.core.embeddings import EmbeddingModels, ServedEmbedder
from vllm_obtain.core.generation import Deltas, run_plan
from vllm_obtain.core.planning import Plan
from vllm_obtain.core.registry import ModelRegistry, UnknownModelError
from vllm_obtain.core.served_model import ServedModel


def registry_of(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or id(request))


def record_of(request: Request) -> RequestRecord:
    """The log and metrics record of this request (made by RequestContextMiddleware)."""
    record = getattr(request.state, "record", None)
    if record is None:  # an app mounted without the middleware
        record = RequestRecord(request_id_of(request), request.method, request.url.path)
        request.state.record = record
    return record


def embedding_models_of(request: Request) -> EmbeddingModels:
    models: EmbeddingModels = getattr(request.app.state, "embedding_models", EmbeddingModels())
    return models


async def served_model(request: Request, model_id: str) -> ServedModel:
    """The model a request names, loaded if it was not (the request waits), and held until
    the response has ended; noted on its record for the log line and metrics."""
    if embedding_models_of(request).find(model_id) is not None:
        raise InvalidRequestError(
            f"'{model_id}' is an embedding model: use it with /v1/embeddings.", param="model"
        )
    lease = await registry_of(request).acquire(model_id)
    when_response_ends(request, lease.release)
    record_of(request).model = lease.model.id
    return lease.model


def when_response_ends(request: Request, callback: Callable[[], None]) -> None:
    """Call `callback` once the response has been sent, a stream's last event included
    (RequestContextMiddleware runs them)."""
    callbacks: list[Callable[[], None]] | None = getattr(request.state, ON_RESPONSE_END, None)
    if callbacks is None:  # without it, a model's lease would never be given back
        raise RuntimeError("the app serves requests without RequestContextMiddleware")
    callbacks.append(callback)


def embedding_model(request: Request, model_id: str) -> ServedEmbedder:
    """The embedding model a request names (a generation model is a 400, not a 404)."""
    record_of(request).model = model_id
    model = embedding_models_of(request).find(model_id)
    if model is not None:
        return model
    if model_id in {e.id for e in registry_of(request).entries()}:
        raise InvalidRequestError(
            f"'{model_id}' generates text; /v1/embeddings needs an embedding model.",
            param="model",
        )
    raise UnknownModelError(model_id)


def note_prompt(request: Request, prompt: object) -> None:
    """Keep the prompt for the request's log line, only where the operator enabled it."""
    config = getattr(request.app.state, "config", None)
    if config is not None and config.log_prompts:
        record_of(request).prompt = json.dumps(prompt, ensure_ascii=False, default=str)


def refuse_unimplemented(param: str | None) -> None:
    """An OpenAI param this server does not implement yet is refused by name."""
    if param is not None:
        raise InvalidRequestError(
            f"'{param}' is not supported by this server yet.", param=param, code="unsupported"
        )


def answer_stream(request: Request, model: ServedModel, plan: Plan) -> Deltas:
    """The plan's text as the client receives it (core.generation.run_plan), measured for the
    request's log line and the metrics."""
    record = record_of(request)
    record.prompt_tokens = plan.prompt_tokens
    metrics: ServerMetrics = request.app.state.metrics
    return metrics.observe(run_plan(model, plan), record)
