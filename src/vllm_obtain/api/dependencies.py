"""What the chat and completion routes share between parsing a request and generating."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from fastapi import Request

from vllm_obtain.api.errors import InvalidRequestError
from vllm_obtain.api.metrics import RequestRecord, ServerMetrics
from vllm_obtain.api.protocol import SamplingFields
from vllm_obtain.core.embeddings import EmbeddingModels, ServedEmbedder
from vllm_obtain.core.generation import (
    admitted,
    before_deadline,
    generate_choices,
    seeded_for_choice,
)
from vllm_obtain.core.manager import ModelRegistry, ServedModel, UnknownModelError
from vllm_obtain.core.prompts import PromptError, check_token_ids, plan_max_tokens
from vllm_obtain.core.requests import ChoiceDelta, GenerationRequest, JsonOutput


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


def served_model(request: Request, model_id: str) -> ServedModel:
    """The model a request names, noted on its record for the log line and metrics."""
    if embedding_models_of(request).find(model_id) is not None:
        raise InvalidRequestError(
            f"'{model_id}' is an embedding model: use it with /v1/embeddings.", param="model"
        )
    model = registry_of(request).get(model_id)
    record_of(request).model = model.id
    return model


def embedding_model(request: Request, model_id: str) -> ServedEmbedder:
    """The embedding model a request names (a generation model is a 400, not a 404)."""
    record_of(request).model = model_id
    model = embedding_models_of(request).find(model_id)
    if model is not None:
        return model
    if model_id in {m.id for m in registry_of(request).all()}:
        raise InvalidRequestError(
            f"'{model_id}' generates text; /v1/embeddings needs an embedding model.",
            param="model",
        )
    raise UnknownModelError(model_id)


def note_prompt(request: Request, prompt: object) -> None:
    """Keep the prompt for the request's log line, only where the operator enabled it."""
    settings = getattr(request.app.state, "settings", None)
    if settings is not None and settings.log_prompts:
        record_of(request).prompt = json.dumps(prompt, ensure_ascii=False, default=str)


def stream_for(
    request: Request,
    model: ServedModel,
    choices: Sequence[tuple[int, GenerationRequest]],
    stops: Sequence[str],
    *,
    prompt_tokens: int,
) -> AsyncIterator[ChoiceDelta]:
    """The choices' text as the client receives it: admitted against the model's bounded queue,
    cut off at the request timeout, measured for the metrics."""
    record = record_of(request)
    record.prompt_tokens = prompt_tokens
    deltas = generate_choices(model.engine, choices, stops)
    deltas = before_deadline(deltas, model.limits.request_timeout)
    deltas = admitted(model, len(choices), deltas)
    metrics: ServerMetrics = request.app.state.metrics
    return metrics.observe(deltas, record)


def refuse_unsupported(body: SamplingFields, model: ServedModel) -> None:
    """A param we cannot honour is refused by name, never silently ignored."""
    param = body.unsupported_param()
    if param is not None:
        raise InvalidRequestError(
            f"'{param}' is not supported by this server yet.", param=param, code="unsupported"
        )
    lacking = sorted(body.features_requested() - model.engine.supported_params)
    if lacking:
        raise InvalidRequestError(
            f"'{lacking[0]}' is not supported by the {model.engine.name} engine.",
            param=lacking[0],
            code="unsupported",
        )


def plan_choices(
    request: Request,
    model: ServedModel,
    prompts: list[list[int]],
    body: SamplingFields,
    token_limit: int | None,
    *,
    prompt_param: str,
    json_output: JsonOutput | None = None,
) -> list[tuple[int, GenerationRequest]]:
    """One GenerationRequest per choice: prompt p, choice j gets index p * n + j."""
    if not prompts:
        raise PromptError("The prompt is empty.", param=prompt_param)
    info = model.loaded_info
    sampling = body.sampling_params()
    if any(not 0 <= token < info.vocab_size for token, _ in sampling.logit_bias):
        raise InvalidRequestError(
            f"logit_bias names a token id outside the vocabulary (0 to {info.vocab_size - 1}).",
            param="logit_bias",
        )
    request_id = request_id_of(request)
    planned = []
    for p, tokens in enumerate(prompts):
        check_token_ids(tokens, info.vocab_size, prompt_param=prompt_param)
        max_tokens = plan_max_tokens(
            len(tokens),
            token_limit,
            info.context_length,
            prompt_param=prompt_param,
            max_prompt_tokens=model.limits.max_prompt_tokens,
            max_tokens_cap=model.limits.max_tokens,
        )
        base = GenerationRequest(
            f"{request_id}-{p}",
            tuple(tokens),
            max_tokens,
            sampling,
            json_output,
            logprobs=body.logprobs_count(),
        )
        planned += [(p * body.n + j, seeded_for_choice(base, j)) for j in range(body.n)]
    return planned
