"""Function calling: tools into the prompt, tool calls out of the generated text.

Models are trained on one of a few formats; this module speaks the most common one, Hermes
(Qwen2.5, Hermes, SmolLM3 and many fine-tunes): calls are JSON objects
`{"name": ..., "arguments": {...}}` inside `<tool_call>...</tool_call>`. A chat template that
renders `tools` itself is given them; for one that does not, the tools are described in the
system prompt in that same format (as llama.cpp and Ollama do for such models).

With tool_choice "required" or a named function, the output is constrained to JSON (a list of
calls, or one call) by the engine's grammar, so a call always comes back and always parses.
Reading the calls back out of the text, as it streams, is core.tool_stream's job.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import jinja2.meta

from vllm_obtain.contract import JsonOutput
from vllm_obtain.core.tool_stream import (
    CLOSE,
    OPEN,
    CallReader,
    ForcedCallReader,
    TaggedCallReader,
)

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
class ToolUse:
    """The tools a chat request offers and how the model must use them: OpenAI's `tools`,
    `tool_choice` (none, auto, required, or one named function) and `parallel_tool_calls`."""

    tools: tuple[Mapping[str, Any], ...] = ()  # function tools, as OpenAI defines them
    choice: Literal["none", "auto", "required"] | None = None
    function: str | None = None  # tool_choice naming a function: it is called, once
    parallel: bool | None = None

    @property
    def forced(self) -> bool:
        """Whether the answer must be a call (then its JSON is enforced while decoding)."""
        return self.choice == "required" or self.function is not None

    def offered(self) -> list[dict[str, Any]]:
        """The tools the model is told about (none under tool_choice "none")."""
        if self.choice == "none":
            return []
        return [dict(tool) for tool in self.tools]

    def problem(self, *, json_format_asked: bool) -> str | None:
        """Why this tool_choice cannot be honoured, if it cannot."""
        names = {tool["function"]["name"] for tool in self.tools}
        if self.forced and not names:
            return "tool_choice needs tools to choose from."
        if self.function is not None and self.function not in names:
            return f"tool_choice names '{self.function}', which is not in tools."
        if self.forced and json_format_asked:
            return "A tool_choice that forces a call cannot be combined with response_format."
        return None

    def reader(self) -> CallReader | None:
        """What reads the calls out of an answer as it streams: the forced JSON, calls inside
        tags among content, or nothing when no tool is offered."""
        if self.forced:
            return ForcedCallReader()
        return TaggedCallReader() if self.offered() else None

    def forced_output(self) -> JsonOutput:
        """The JSON a forced answer must be: one call of the named function, or under
        "required" a list of calls (one call if parallel calls are turned off)."""
        parallel = self.function is None and self.parallel is not False
        schema = forced_call_schema(self.offered(), self.function, parallel=parallel)
        return JsonOutput(json.dumps(schema), param="tool_choice")


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
