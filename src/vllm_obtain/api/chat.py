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
from vllm_obtain.api.errors import InvalidRequestError
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
from vllm_obtain.api.streaming import (
    CollectedChoice,
    ResponseMeta,
    collect_choices,
    primed,
    sse_response,
    unless_client_leaves,
)
from vllm_obtain.core.requests import ChoiceDelta
from vllm_obtain.core.tools import CallReader, ForcedCallReader, TaggedCallReader, ToolCall

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    model = served_model(request, body.model)
    messages = [m.for_template() for m in body.messages]
    note_prompt(request, messages)
    refuse_unsupported(body, model)
    if (problem := body.tool_choice_problem()) is not None:
        raise InvalidRequestError(problem, param="tool_choice")
    tools = body.active_tools()
    prompt_tokens = await model.chat_prompt_tokens(messages, tools)
    requests = plan_choices(
        request,
        model,
        [prompt_tokens],
        body,
        body.token_limit,
        prompt_param="messages",
        json_output=body.json_output(),
    )
    meta = ResponseMeta.new("chatcmpl", model.id, len(prompt_tokens))
    deltas = stream_for(
        request, model, requests, body.stop_strings(), prompt_tokens=meta.prompt_tokens
    )
    shaping = ChatShaping(body, offers_tools=bool(tools))
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
    the logprobs when asked for."""

    def __init__(self, body: ChatCompletionRequest, *, offers_tools: bool) -> None:
        self.with_logprobs = body.logprobs_count() is not None
        self._forced = body.forced_tool_call()
        self._offers_tools = offers_tools
        self._readers: dict[int, CallReader] = {}

    def reader(self, index: int) -> CallReader | None:
        if not self._offers_tools:
            return None
        if index not in self._readers:
            self._readers[index] = ForcedCallReader() if self._forced else TaggedCallReader()
        return self._readers[index]

    def choice(self, index: int, collected: CollectedChoice) -> ChatChoice:
        content, calls = collected.text, list[ToolCall]()
        if (reader := self.reader(index)) is not None:
            content, calls = reader.feed(collected.text)
            rest, more = reader.finish()
            content, calls = content + rest, calls + more
        message = ChatResponseMessage(
            content=content or (None if calls else ""),
            tool_calls=[response_tool_call(c) for c in calls] or None,
        )
        return ChatChoice(
            index=index,
            message=message,
            logprobs=chat_logprobs(collected.logprobs) if self.with_logprobs else None,
            finish_reason=finish_reason(collected.finish_reason, bool(calls)),
        )


def finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def response_tool_call(call: ToolCall) -> ResponseToolCall:
    return ResponseToolCall(
        id=call.id, function=ResponseFunction(name=call.name, arguments=call.arguments)
    )


def tool_call_deltas(position: int, call: ToolCall) -> list[ToolCallDelta]:
    """A call as OpenAI streams it: id and name first, then the arguments (clients join the
    argument fragments; ours come whole, once the call is complete)."""
    return [
        ToolCallDelta(
            index=position,
            id=call.id,
            type="function",
            function=FunctionDelta(name=call.name, arguments=""),
        ),
        ToolCallDelta(index=position, function=FunctionDelta(arguments=call.arguments)),
    ]


async def chat_chunks(
    deltas: AsyncIterator[ChoiceDelta],
    meta: ResponseMeta,
    shaping: ChatShaping,
    n: int,
    *,
    include_usage: bool,
) -> AsyncIterator[ChatCompletionChunk]:
    """OpenAI's chunk sequence: the role first, content and tool call deltas, one
    finish_reason per choice, then the usage chunk (empty choices) when asked for."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )

    for index in range(n):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    calls_sent: dict[int, int] = {}  # choice index -> tool calls streamed so far
    completion_tokens = 0
    async for delta in deltas:
        index = delta.index
        text, calls = delta.text, list[ToolCall]()
        if (reader := shaping.reader(index)) is not None:
            text, calls = reader.feed(delta.text)
            if delta.finish_reason is not None:
                rest, more = reader.finish()
                text, calls = text + rest, calls + more
        if text:
            logprobs = chat_logprobs(delta.logprobs) if shaping.with_logprobs else None
            content = ChatDelta(content=text)
            yield chunk([ChatChunkChoice(index=index, delta=content, logprobs=logprobs)])
        for call in calls:
            position = calls_sent.get(index, 0)
            calls_sent[index] = position + 1
            for part in tool_call_deltas(position, call):
                yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=[part]))])
        if delta.finish_reason is not None:
            completion_tokens += delta.completion_tokens
            reason = finish_reason(delta.finish_reason, index in calls_sent)
            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)])
    if include_usage:
        yield chunk([], usage=meta.usage(completion_tokens))
