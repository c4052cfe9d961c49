"""Reading tool calls out of generated text as it streams, so that a client sees each call's
name as soon as it is written and its arguments fragment by fragment, as OpenAI streams them.

A call is the JSON object `{"name": ..., "arguments": ...}`: inside `<tool_call>` tags under
tool_choice "auto" (TaggedCallReader), or as the whole answer, one object or a list of them,
when the grammar forced a call (ForcedCallReader). Both turn text into CallEvents; the plain
answer is assembled from the same events as the streamed one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from vllm_obtain.core.textstream import stop_prefix_overlap

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The head of a call written name first, as models are trained to (and as our grammar orders it).
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class CallEvent:
    """Part of the `position`-th call of a choice: its start (id and name), or a fragment of
    its arguments (JSON text; the fragments of a call join into it)."""

    position: int
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    """A whole call, as the plain (not streamed) answer gives it."""

    id: str
    name: str
    arguments: str = ""


def assemble(events: list[CallEvent]) -> list[ToolCall]:
    calls: dict[int, ToolCall] = {}
    for event in events:
        if event.call_id is not None:
            calls[event.position] = ToolCall(event.call_id, event.name or "")
        calls[event.position].arguments += event.arguments
    return [calls[p] for p in sorted(calls)]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class JsonValueScanner:
    """Finds where one JSON value ends in text that arrives piece by piece."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False
    done: bool = False

    def scan(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them unless it ended)."""
        if self.done:
            return 0
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return self._end(i + 1)
                continue
            if not self.started and char.isspace():
                continue
            if self.started and self.depth == 0 and (char in ",}]" or char.isspace()):
                return self._end(i)  # the end of a bare number, true, false or null
            self.started = True
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return self._end(i + 1)
        return len(text)

    def _end(self, at: int) -> int:
        self.done = True
        return at


@dataclass
class CallObjectReader:
    """Reads one `{"name": ..., "arguments": ...}` object as it streams."""

    position: int
    head: str = ""
    started: bool = False
    arguments: JsonValueScanner = field(default_factory=JsonValueScanner)
    closed: bool = False  # the object's own closing brace has been read

    def feed(self, text: str) -> tuple[list[CallEvent], str]:
        """Events for `text`, and what follows the object's end (if it ended)."""
        events: list[CallEvent] = []
        if not self.started:
            self.head += text
            match = CALL_HEAD.match(self.head)
            if match is None:
                return events, ""
            self.started = True
            name = json.loads(f'"{match.group(1)}"')
            events.append(CallEvent(self.position, new_call_id(), name))
            text = self.head[match.end() :]
        if not self.arguments.done:
            if not self.arguments.started:
                text = text.lstrip()  # blanks before the value are not part of it
            used = self.arguments.scan(text)
            if used:
                events.append(CallEvent(self.position, arguments=text[:used]))
            text = text[used:]
        if self.arguments.done and not self.closed:
            stripped = text.lstrip()
            if not stripped:
                return events, ""
            self.closed = stripped.startswith("}")
            text = stripped[1:] if self.closed else stripped
        return events, text if self.closed else ""


class TaggedCallReader:
    """For tool_choice "auto": content outside `<tool_call>` tags, calls inside them.

    Text that may begin `<tool_call>` is held back (as stop strings are), so markup never
    reaches the client as content. A block whose head is not `{"name": ..., "arguments": ...}`
    is read whole when it closes: a call if it parses as one, else given back as content.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._body: str | None = None  # the text of the open block, None outside blocks
        self._call: CallObjectReader | None = None
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[CallEvent]]:
        """Add generated text; return the content now safe to send and the call events."""
        self._pending += text
        content, events = "", list[CallEvent]()
        while True:
            if self._body is None:
                start = self._pending.find(OPEN)
                if start == -1:
                    keep = stop_prefix_overlap(self._pending, [OPEN])
                    cut = len(self._pending) - keep
                    content, self._pending = content + self._pending[:cut], self._pending[cut:]
                    return content, events
                content += self._pending[:start]
                self._pending = self._pending[start + len(OPEN) :]
                self._body, self._call = "", CallObjectReader(self.calls)
            end = self._pending.find(CLOSE)
            # Up to the close tag, or all but what may be its beginning.
            take = (
                end
                if end != -1
                else len(self._pending) - stop_prefix_overlap(self._pending, [CLOSE])
            )
            piece, self._pending = self._pending[:take], self._pending[take:]
            self._body += piece
            events += self._stream(piece)
            if end == -1:
                return content, events
            self._pending = self._pending[len(CLOSE) :]
            text_back, closing = self._close()
            content, events = content + text_back, events + closing

    def finish(self) -> tuple[str, list[CallEvent]]:
        """The text ended: an open block is closed as if its tag had come (models often stop
        right after the JSON)."""
        rest, self._pending = self._pending, ""
        if self._body is None:
            return rest, []
        self._body += rest
        events = self._stream(rest)
        text_back, closing = self._close()
        return text_back, events + closing

    def _stream(self, piece: str) -> list[CallEvent]:
        assert self._call is not None
        if self._call.closed:
            return []
        events, _ = self._call.feed(piece)
        return events

    def _close(self) -> tuple[str, list[CallEvent]]:
        body, call = self._body or "", self._call
        self._body, self._call = None, None
        if call is not None and call.started:
            self.calls += 1
            return "", []  # its events are out already
        try:
            value = json.loads(body)
            name, arguments = value["name"], value.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return OPEN + body + CLOSE, []
        if not isinstance(name, str):
            return OPEN + body + CLOSE, []
        position, self.calls = self.calls, self.calls + 1
        text = (
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        )
        return "", [CallEvent(position, new_call_id(), name), CallEvent(position, arguments=text)]


class ForcedCallReader:
    """For tool_choice "required" or a named function: the answer is one call object, or a
    list of them (the grammar saw to it), read as it streams."""

    def __init__(self) -> None:
        self._call: CallObjectReader | None = None
        self._pending = ""
        self._text = ""  # all of it, for a call written arguments first
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[CallEvent]]:
        self._text += text
        self._pending += text
        events: list[CallEvent] = []
        while self._pending:
            if self._call is None:
                # Between calls: list brackets, commas and blanks; a call starts at "{".
                start = self._pending.find("{")
                if start == -1:
                    self._pending = ""
                    break
                self._pending = self._pending[start:]
                self._call = CallObjectReader(self.calls)
            found, rest = self._call.feed(self._pending)
            events += found
            self._pending = ""
            if not self._call.closed:
                break
            self._call, self.calls, self._pending = None, self.calls + 1, rest
        return "", events

    def finish(self) -> tuple[str, list[CallEvent]]:
        if self._call is not None and self._call.started:
            self.calls += 1
        if self.calls or self._call is None:
            return "", []
        # No call head matched as it streamed (keys in another order): read the whole answer.
        try:
            value = json.loads(self._text)
            items = value if isinstance(value, list) else [value]
            events = []
            for position, item in enumerate(items):
                arguments = json.dumps(item["arguments"], ensure_ascii=False)
                events += [CallEvent(position, new_call_id(), item["name"]),
                           CallEvent(position, arguments=arguments)]  # fmt: skip
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: not JSON yet
            return self._text, []
        self.calls = len(items)
        return "", events


CallReader = TaggedCallReader | ForcedCallReader
