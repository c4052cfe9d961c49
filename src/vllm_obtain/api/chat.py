"""POST /v1/chat/completions."""

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
from vllm_obtain.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatResponseMessage,
    Usage,
)
from vllm_obtain.api.streaming import (
    ResponseMeta,
    collect_choices,
    primed,
    sse_response,
    unless_client_leaves,
)
from vllm_obtain.core.requests import ChoiceDelta

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    model = served_model(request, body.model)
    note_prompt(request, [m.for_template() for m in body.messages])
    refuse_unsupported(body, model)
    prompt_tokens = await model.chat_prompt_tokens([m.for_template() for m in body.messages])
    requests = plan_choices(
        request, model, [prompt_tokens], body, body.token_limit, prompt_param="messages"
    )
    meta = ResponseMeta.new("chatcmpl", model.id, len(prompt_tokens))
    deltas = stream_for(
        request, model, requests, body.stop_strings(), prompt_tokens=meta.prompt_tokens
    )
    if body.stream:
        return sse_response(chat_chunks(await primed(deltas), meta, body.n, body.include_usage))
    choices = await unless_client_leaves(request, collect_choices(deltas, body.n))
    completion = ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content=c.text),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=meta.usage(sum(c.completion_tokens for c in choices)),
    )
    return JSONResponse(completion.model_dump(mode="json"))


async def chat_chunks(
    deltas: AsyncIterator[ChoiceDelta], meta: ResponseMeta, n: int, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    """OpenAI's chunk sequence: the role first, content deltas, one finish_reason per choice,
    then the usage chunk (empty choices) when asked for."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )

    for index in range(n):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    completion_tokens = 0
    async for delta in deltas:
        if delta.text:
            yield chunk([ChatChunkChoice(index=delta.index, delta=ChatDelta(content=delta.text))])
        if delta.finish_reason is not None:
            completion_tokens += delta.completion_tokens
            yield chunk(
                [
                    ChatChunkChoice(
                        index=delta.index, delta=ChatDelta(), finish_reason=delta.finish_reason
                    )
                ]
            )
    if include_usage:
        yield chunk([], usage=meta.usage(completion_tokens))
