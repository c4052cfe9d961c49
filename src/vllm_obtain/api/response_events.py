"""One Responses API answer, built from the model's text as it streams: its output items (a
message, function calls) and the semantic events OpenAI streams for them, in OpenAI's order with
increasing sequence numbers. The plain answer is the same builder with its events unused, so the
two can never disagree."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from loguru import logger

from vllm_obtain.api.errors import as_openai_error
from vllm_obtain.api.protocol import json_or_text
from vllm_obtain.api.responses_protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallOutput,
    IncompleteDetails,
    ItemStatus,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponseEvent,
    ResponseLifecycleEvent,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
    new_id,
)
from vllm_obtain.contract import FinishReason
from vllm_obtain.core.generation import ChoiceDelta, Deltas
from vllm_obtain.core.tool_stream import CallEvent
from vllm_obtain.core.tools import ToolUse

# The events that end a response's stream: it is stored before one is sent.
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponseBuilder:
    def __init__(self, response: Response, tools: ToolUse, *, input_tokens: int) -> None:
        self.response = response
        self._reader = tools.reader()
        self._input_tokens = input_tokens
        self._numbers = itertools.count()
        self._open: OutputItem | None = None  # the item text or arguments go to now

    def started(self) -> list[ResponseEvent]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def feed(self, delta: ChoiceDelta) -> list[ResponseEvent]:
        """The events for the next piece of the model's text (and its end, if it ended)."""
        text, calls = delta.text, list[CallEvent]()
        if self._reader is not None:
            text, calls = self._reader.feed(text)
            if delta.finish_reason is not None:
                rest, more = self._reader.finish()
                text, calls = text + rest, calls + more
        events = self._text(text) if text else []
        for call in calls:
            events += self._call(call)
        if delta.finish_reason is not None:
            events += self._finish(delta.finish_reason, delta.completion_tokens)
        return events

    def failed(self, message: str) -> list[ResponseEvent]:
        """The model failed midway: what was written stays, marked incomplete."""
        events = self._close("incomplete") if self._open is not None else []
        self.response.status = "failed"
        self.response.error = ResponseError(code="server_error", message=message)
        return [*events, self._lifecycle("response.failed")]

    def assistant_message(self) -> dict[str, Any]:
        """The answer as a chat message, for the conversation a next turn continues."""
        text = "".join(
            part.text
            for item in self.response.output
            if isinstance(item, OutputMessage)
            for part in item.content
        )
        calls = [
            {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": json_or_text(item.arguments)},
            }
            for item in self.response.output
            if isinstance(item, FunctionCallOutput)
        ]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}

    # --- items -------------------------------------------------------------------------------

    def _text(self, text: str) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if not isinstance(self._open, OutputMessage):
            events += self._close("completed") if self._open is not None else []
            events += self._open_message()
        message = self._open
        assert isinstance(message, OutputMessage)
        message.content[0].text += text
        events.append(
            TextDeltaEvent(
                sequence_number=self._number(),
                item_id=message.id,
                output_index=self._index(),
                content_index=0,
                delta=text,
            )
        )
        return events

    def _call(self, call: CallEvent) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if call.call_id is not None:  # a new call: its name is known, arguments follow
            events += self._close("completed") if self._open is not None else []
            started = FunctionCallOutput(
                id=new_id("fc"),
                status="in_progress",
                call_id=call.call_id,
                name=call.name or "",
                arguments="",
            )
            events += self._add(started)
        item = self._open
        assert isinstance(item, FunctionCallOutput)
        if call.arguments:
            item.arguments += call.arguments
            events.append(
                ArgumentsDeltaEvent(
                    sequence_number=self._number(),
                    item_id=item.id,
                    output_index=self._index(),
                    delta=call.arguments,
                )
            )
        return events

    def _open_message(self) -> list[ResponseEvent]:
        message = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        events = self._add(message)
        part = OutputText(text="")
        message.content.append(part)
        events.append(self._part("response.content_part.added", message, part))
        return events

    def _add(self, item: OutputItem) -> list[ResponseEvent]:
        self.response.output.append(item)
        self._open = item
        return [self._item_event("response.output_item.added", item)]

    def _close(self, status: ItemStatus) -> list[ResponseEvent]:
        item, index = self._open, self._index()
        assert item is not None
        item.status = status
        events: list[ResponseEvent] = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events.append(
                TextDoneEvent(
                    sequence_number=self._number(),
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=part.text,
                )
            )
            events.append(self._part("response.content_part.done", item, part))
        else:
            events.append(
                ArgumentsDoneEvent(
                    sequence_number=self._number(),
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        events.append(self._item_event("response.output_item.done", item))
        self._open = None
        return events

    def _finish(self, reason: FinishReason, output_tokens: int) -> list[ResponseEvent]:
        status: ItemStatus = "incomplete" if reason == "length" else "completed"
        events = [] if self.response.output else self._open_message()  # always an answer
        if self._open is not None:
            events += self._close(status)
        response = self.response
        response.status = status
        if reason == "length":
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        else:
            response.completed_at = int(time.time())
        response.usage = ResponseUsage(
            input_tokens=self._input_tokens,
            output_tokens=output_tokens,
            total_tokens=self._input_tokens + output_tokens,
        )
        kind = "response.incomplete" if reason == "length" else "response.completed"
        return [*events, self._lifecycle(kind)]

    # --- events ------------------------------------------------------------------------------

    def _number(self) -> int:
        return next(self._numbers)

    def _index(self) -> int:
        return len(self.response.output) - 1

    def _lifecycle(self, kind: str) -> ResponseEvent:
        # A copy: the response goes on changing after this event is made.
        snapshot = self.response.model_copy(deep=True)
        return ResponseLifecycleEvent(type=kind, sequence_number=self._number(), response=snapshot)

    def _item_event(self, kind: str, item: OutputItem) -> ResponseEvent:
        return OutputItemEvent(
            type=kind,
            sequence_number=self._number(),
            output_index=self._index(),
            item=item.model_copy(deep=True),
        )

    def _part(self, kind: str, message: OutputMessage, part: OutputText) -> ResponseEvent:
        return ContentPartEvent(
            type=kind,
            sequence_number=self._number(),
            item_id=message.id,
            output_index=self._index(),
            content_index=0,
            part=part.model_copy(),
        )


async def response_events(
    deltas: Deltas,
    builder: ResponseBuilder,
    *,
    on_end: Callable[[Response], Awaitable[None]] | None = None,
) -> AsyncGenerator[ResponseEvent, None]:
    """The stream of events for a response, to its end: response.completed or .incomplete, or
    response.failed when the model fails midway (never a connection cut without a word).
    `on_end` gets the finished response before that last event is sent: a client may hang up
    as soon as it reads it, and a response it was told is stored must be (not when the client
    went away before the end)."""
    ended = False

    async def ending(event: ResponseEvent) -> ResponseEvent:
        nonlocal ended
        if event.type in TERMINAL_EVENTS and on_end is not None and not ended:
            ended = True
            try:
                await on_end(builder.response)
            except Exception as exc:  # the answer is whole: a store that failed is not the model's
                logger.opt(exception=exc).error(
                    "response {} not stored: {}", builder.response.id, exc
                )
        return event

    for event in builder.started():
        yield event
    try:
        async for delta in deltas:
            for event in builder.feed(delta):
                yield await ending(event)
    except Exception as exc:  # the engine failed or timed out after the answer had begun
        logger.opt(exception=exc).error("response {} failed: {}", builder.response.id, exc)
        for event in builder.failed(as_openai_error(exc).message):
            yield await ending(event)
    finally:
        await deltas.aclose()
    if on_end is not None and not ended:  # a stream that ended without a last word
        await on_end(builder.response)


async def built_response(deltas: Deltas, builder: ResponseBuilder) -> Response:
    """The whole answer at once (the events are made and dropped)."""
    async for delta in deltas:
        builder.feed(delta)
    return builder.response
