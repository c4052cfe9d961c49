"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_obtain.api.errors import InvalidRequestError
from vllm_obtain.api.logprobs import completion_logprobs
from vllm_obtain.api.protocol import Completion, CompletionChoice, CompletionRequest
from vllm_obtain.api.request_scope import (
    answer_stream,
    note_prompt,
    refuse_unimplemented,
    request_id_of,
    served_model,
)
from vllm_obtain.api.streaming import (
    ResponseMeta,
    collect_choices,
    primed,
    sse_response,
    unless_client_leaves,
)
from vllm_obtain.contract import FinishReason, TokenLogprob
from vllm_obtain.core.generation import Deltas
from vllm_obtain.core.planning import plan_completion

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    refuse_unimplemented(body.unsupported_param())  # before a model may be loaded for it
    model = await served_model(request, body.model)
    note_prompt(request, body.prompt)
    prompts = body.prompts(document_start=model.loaded_info.bos_token)
    plan = await plan_completion(
        model, prompts, body.to_options(), request_id=request_id_of(request)
    )
    meta = ResponseMeta.new("cmpl", model.id, plan.prompt_tokens)
    count = len(plan.choices)
    shaping = ChoiceShaping(echoes(body, prompts), body.n, with_logprobs=body.logprobs is not None)
    deltas = answer_stream(request, model, plan)
    if body.stream:
        return sse_response(completion_chunks(await primed(deltas), meta, shaping, body))
    choices = await unless_client_leaves(request, collect_choices(deltas, count))
    completion = Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            shaping.choice(i, c.text, c.logprobs, c.finish_reason) for i, c in enumerate(choices)
        ],
        usage=meta.usage(sum(c.completion_tokens for c in choices)),
    )
    return JSONResponse(completion.model_dump(mode="json"))


def echoes(body: CompletionRequest, texts: list[str | list[int]]) -> list[str]:
    """What each prompt's choices start with: the prompt itself under `echo`, else nothing."""
    if not body.echo:
        return [""] * len(texts)
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequestError("'echo' needs the prompt as text, not token ids.", param="echo")
    return [str(t) for t in texts]


class ChoiceShaping:
    """Builds each choice, plain or streamed: the echoed prompt before its first text, and
    text offsets for its logprobs that count what was sent before."""

    def __init__(self, echoes: list[str], n: int, *, with_logprobs: bool) -> None:
        self._echoes, self._n, self._with_logprobs = echoes, n, with_logprobs
        self._sent: dict[int, int] = {}  # choice index -> characters sent so far

    def choice(
        self,
        index: int,
        text: str,
        logprobs: Sequence[TokenLogprob],
        finish_reason: FinishReason | None,
    ) -> CompletionChoice:
        echo = ""
        if index not in self._sent:
            echo, self._sent[index] = self._echoes[index // self._n], 0
        offset = self._sent[index] + len(echo)  # where this text's first token starts
        self._sent[index] = offset + len(text)
        text = echo + text
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=completion_logprobs(logprobs, offset) if self._with_logprobs else None,
            finish_reason=finish_reason,
        )


async def completion_chunks(
    deltas: Deltas,
    meta: ResponseMeta,
    shaping: ChoiceShaping,
    body: CompletionRequest,
) -> AsyncGenerator[Completion, None]:
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
                    shaping.choice(delta.index, delta.text, delta.logprobs, delta.finish_reason)
                ],
            )
    if body.include_usage:
        yield Completion(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[],
            usage=meta.usage(completion_tokens),
        )
