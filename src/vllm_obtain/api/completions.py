"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_obtain.api.dependencies import (
    note_prompt,
    plan_choices,
    refuse_unsupported,
    served_model,
    stream_for,
)
from vllm_obtain.api.protocol import Completion, CompletionChoice, CompletionRequest
from vllm_obtain.api.streaming import (
    ResponseMeta,
    collect_choices,
    primed,
    sse_response,
    unless_client_leaves,
)
from vllm_obtain.core.requests import ChoiceDelta

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    model = served_model(request, body.model)
    note_prompt(request, body.prompt)
    refuse_unsupported(body, model)
    prompts = [
        p if isinstance(p, list) else await model.engine.tokenize(p, add_special=True)
        for p in body.prompts()
    ]
    requests = plan_choices(request, model, prompts, body, body.max_tokens, prompt_param="prompt")
    meta = ResponseMeta.new("cmpl", model.id, sum(len(p) for p in prompts))
    count = len(requests)
    deltas = stream_for(
        request, model, requests, body.stop_strings(), prompt_tokens=meta.prompt_tokens
    )
    if body.stream:
        return sse_response(completion_chunks(await primed(deltas), meta, body.include_usage))
    choices = await unless_client_leaves(request, collect_choices(deltas, count))
    completion = Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)
            for i, c in enumerate(choices)
        ],
        usage=meta.usage(sum(c.completion_tokens for c in choices)),
    )
    return JSONResponse(completion.model_dump(mode="json"))


async def completion_chunks(
    deltas: AsyncIterator[ChoiceDelta], meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[Completion]:
    completion_tokens = 0
    async for delta in deltas:
        if delta.finish_reason is not None:
            completion_tokens += delta.completion_tokens
        if delta.text or delta.finish_reason is not None:
            yield Completion(
                id=meta.id,
                created=meta.created,
                model=meta.model,
                choices=[
                    CompletionChoice(
                        index=delta.index, text=delta.text, finish_reason=delta.finish_reason
                    )
                ],
            )
    if include_usage:
        yield Completion(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[],
            usage=meta.usage(completion_tokens),
        )
