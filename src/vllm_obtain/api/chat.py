"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_obtain.api.logprobs import chat_logprobs
from vllm_obtain.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatResponseMessage,
    FunctionDelta,
    ResponseFunction,
    ResponseToolCall,
    ToolCallDelta,
    Usage,
)
from vllm_obtain.api.request_scope import (
    answer_stream,
    note_prompt,
    refuse_unimplemented,
    request_id_of,
    served_model,
)
from vllm_obtain.api.streaming import (
    CollectedChoice,
    ResponseMeta,
    collect_choices,
    primed,
    sse_response,
    unless_client_leaves,
)
from vllm_obtain.core.generation import Deltas
from vllm_obtain.core.planning import plan_chat
from vllm_obtain.core.tool_stream import CallEvent, CallReader, assemble
from vllm_obtain.core.tools import ToolUse

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    # Refused before the model is found: a bad request must not load one (or unload another).
    refuse_unimplemented(body.unsupported_param())
    model = await served_model(request, body.model)
    messages = body.messages_for_template()
    note_prompt(request, messages)
    options, tools = body.to_options(), body.tool_use()
    plan = await plan_chat(model, messages, tools, options, request_id=request_id_of(request))
    meta = ResponseMeta.new("chatcmpl", model.id, plan.prompt_tokens)
    deltas = answer_stream(request, model, plan)
    shaping = ChatShaping(tools, with_logprobs=options.logprobs is not None)
    if body.stream:
        chunks = chat_chunks(
            await primed(deltas), meta, shaping, body.n, include_usage=body.include_usage
        )
        return sse_response(chunks)
    choices = await unless_client_leaves(request, collect_choices(deltas, body.n))
    completion = ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[shaping.choice(i, c) for i, c in enumerate(choices)],
        usage=meta.usage(sum(c.completion_tokens for c in choices)),
    )
    return JSONResponse(completion.model_dump(mode="json"))


class ChatShaping:
    """What a choice's text becomes for the client: content, tool calls read out of it, and
    the logprobs when asked for. The plain answer and the stream read calls the same way."""

    def __init__(self, tools: ToolUse, *, with_logprobs: bool) -> None:
        self.with_logprobs = with_logprobs
        self._tools = tools
        self._readers: dict[int, CallReader | None] = {}

    def read(self, index: int, text: str, *, last: bool) -> tuple[str, list[CallEvent]]:
        """Content and call events in the next piece of choice `index`'s text."""
        if index not in self._readers:
            self._readers[index] = self._tools.reader()
        reader = self._readers[index]
        if reader is None:
            return text, []
        content, events = reader.feed(text)
        if last:
            rest, more = reader.finish()
            content, events = content + rest, events + more
        return content, events

    def called(self, index: int) -> bool:
        reader = self._readers.get(index)
        return reader is not None and reader.calls > 0

    def choice(self, index: int, collected: CollectedChoice) -> ChatChoice:
        content, events = self.read(index, collected.text, last=True)
        calls = assemble(events)
        message = ChatResponseMessage(
            content=content or (None if calls else ""),
            tool_calls=[
                ResponseToolCall(
                    id=c.id, function=ResponseFunction(name=c.name, arguments=c.arguments)
                )
                for c in calls
            ]
            or None,
        )
        return ChatChoice(
            index=index,
            message=message,
            logprobs=chat_logprobs(collected.logprobs) if self.with_logprobs else None,
            finish_reason=self.finish_reason(index, collected.finish_reason),
        )

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called(index) else reason


def tool_call_delta(event: CallEvent) -> ToolCallDelta:
    """A call event as OpenAI streams it: id, type and name first, then argument fragments."""
    if event.call_id is not None:
        return ToolCallDelta(
            index=event.position,
            id=event.call_id,
            type="function",
            function=FunctionDelta(name=event.name, arguments=event.arguments),
        )
    return ToolCallDelta(index=event.position, function=FunctionDelta(arguments=event.arguments))


async def chat_chunks(
    deltas: Deltas,
    meta: ResponseMeta,
    shaping: ChatShaping,
    n: int,
    *,
    include_usage: bool,
) -> AsyncGenerator[ChatCompletionChunk, None]:
    """OpenAI's chunk sequence: the role first, content and tool call deltas, one
    finish_reason per choice, then the usage chunk (empty choices) when asked for."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )

    for index in range(n):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    completion_tokens = 0
    async for delta in deltas:
        index = delta.index
        last = delta.finish_reason is not None
        text, events = shaping.read(index, delta.text, last=last)
        if text:
            logprobs = chat_logprobs(delta.logprobs) if shaping.with_logprobs else None
            content = ChatDelta(content=text)
            yield chunk([ChatChunkChoice(index=index, delta=content, logprobs=logprobs)])
        for event in events:
            call = ChatDelta(tool_calls=[tool_call_delta(event)])
            yield chunk([ChatChunkChoice(index=index, delta=call)])
        if last:
            completion_tokens += delta.completion_tokens
            reason = shaping.finish_reason(index, delta.finish_reason)
            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)])
    if include_usage:
        yield chunk([], usage=meta.usage(completion_tokens))
