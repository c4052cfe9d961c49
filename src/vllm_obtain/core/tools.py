"""Function calling: tools into the prompt, tool calls out of the generated text.

Models are trained on one of a few formats; this module speaks the most common one, Hermes
(Qwen2.5, Hermes, SmolLM3 and many fine-tunes): calls are JSON objects
`{"name": ..., "arguments": {...}}` inside `<tool_call>...</tool_call>`. A chat template that
renders `tools` itself is given them; for one that does not, the tools are described in the
system prompt in that same format (as llama.cpp and Ollama do for such models).

With tool_choice "required" or a named function, the output is constrained to JSON (a list of
calls, or one call) by the engine's grammar, so a call always comes back and always parses.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from vllm_obtain.core.textstream import stop_prefix_overlap

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


def new_call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, text)


@functools.lru_cache(maxsize=16)
def template_renders_tools(template: str) -> bool:
    """Whether the chat template uses the `tools` variable (else we describe them ourselves)."""
    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(parsed)


def messages_with_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """For templates that know nothing of tools: the tools described in the system prompt,
    earlier calls and their results written out as the model's format has them."""
    described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
    out = plain_messages(messages)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{described}"
    else:
        out.insert(0, {"role": "system", "content": described})
    return out


def plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [plain_message(m) for m in messages]


def plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message with tool calls or a tool result, as text a tool-less template can render."""
    if message["role"] == "tool":
        response = f"<tool_response>\n{message['content']}\n</tool_response>"
        return {"role": "user", "content": response}
    calls = message.get("tool_calls") or []
    if not calls:
        return dict(message)
    written = [
        f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}\n{CLOSE}"  # noqa: E501
        for c in calls
    ]
    content = message.get("content") or ""
    return {"role": "assistant", "content": "\n".join([content, *written]).strip()}


def forced_call_schema(
    tools: Sequence[Mapping[str, Any]], name: str | None, *, parallel: bool
) -> dict[str, Any]:
    """The JSON a constrained answer must be: one call (of `name`, or of any tool), or with
    parallel calls allowed, a non-empty list of them."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for f in chosen
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if not parallel:
        return call
    # Bounded, so that a small model repeating itself ends rather than running to max_tokens.
    return {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}


def calls_from_json(text: str) -> list[ToolCall]:
    """The calls in a constrained answer (see forced_call_schema)."""
    value = json.loads(text)
    items = value if isinstance(value, list) else [value]
    return [new_call(item["name"], item["arguments"]) for item in items]


def _parse_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return new_call(value["name"], value.get("arguments", {}))


class TaggedCallReader:
    """Splits streamed text into content and `<tool_call>` blocks, for tool_choice "auto".

    Text that may be the start of `<tool_call>` is held back (as stop strings are), so a call's
    markup never reaches the client as content. A block that is not a valid call is given back
    as content.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add generated text; return the content that is now safe and any calls completed."""
        self._pending += text
        content, calls = "", list[ToolCall]()
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end == -1:
                    return content, calls
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
                self._in_call = False
                call = _parse_call(body)
                if call is None:
                    content += OPEN + body + CLOSE
                else:
                    calls.append(call)
                    self.calls.append(call)
                continue
            start = self._pending.find(OPEN)
            if start == -1:
                keep = stop_prefix_overlap(self._pending, [OPEN])
                cut = len(self._pending) - keep
                content += self._pending[:cut]
                self._pending = self._pending[cut:]
                return content, calls
            content += self._pending[:start]
            self._pending = self._pending[start + len(OPEN) :]
            self._in_call = True

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text ended: a call left unclosed still counts if it parses (models often stop
        right after the JSON)."""
        rest, self._pending = self._pending, ""
        if not self._in_call:
            return rest, []
        call = _parse_call(rest)
        if call is None:
            return OPEN + rest, []
        self.calls.append(call)
        return "", [call]


class ForcedCallReader:
    """For tool_choice "required" or a named function: the whole answer is JSON calls (the
    engine's grammar saw to it), read when it ends."""

    def __init__(self) -> None:
        self._text = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._text += text
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        try:
            self.calls = calls_from_json(self._text)
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: not JSON yet
            return self._text, []
        return "", self.calls


CallReader = TaggedCallReader | ForcedCallReader
