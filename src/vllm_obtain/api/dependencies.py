"""What the chat and completion routes share between parsing a request and generating."""

from __future__ import annotations

from fastapi import Request

from vllm_obtain.api.errors import InvalidRequestError
from vllm_obtain.api.protocol import SamplingFields
from vllm_obtain.core.generation import seeded_for_choice
from vllm_obtain.core.manager import ModelRegistry, ServedModel
from vllm_obtain.core.prompts import PromptError, check_token_ids, plan_max_tokens
from vllm_obtain.core.requests import GenerationRequest


def registry_of(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or id(request))


def refuse_unsupported(body: SamplingFields, model: ServedModel) -> None:
    """A param we cannot honour is refused by name, never silently ignored."""
    param = body.unsupported_param()
    if param is not None:
        raise InvalidRequestError(
            f"'{param}' is not supported by this server yet.", param=param, code="unsupported"
        )
    lacking = sorted(body.sampling_params_set() - model.engine.supported_params)
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
) -> list[tuple[int, GenerationRequest]]:
    """One GenerationRequest per choice: prompt p, choice j gets index p * n + j."""
    if not prompts:
        raise PromptError("The prompt is empty.", param=prompt_param)
    info = model.loaded_info
    sampling = body.sampling_params()
    request_id = request_id_of(request)
    planned = []
    for p, tokens in enumerate(prompts):
        check_token_ids(tokens, info.vocab_size, prompt_param=prompt_param)
        max_tokens = plan_max_tokens(
            len(tokens), token_limit, info.context_length, prompt_param=prompt_param
        )
        base = GenerationRequest(f"{request_id}-{p}", tuple(tokens), max_tokens, sampling)
        planned += [(p * body.n + j, seeded_for_choice(base, j)) for j in range(body.n)]
    return planned
