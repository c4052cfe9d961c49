"""The Responses API's shapes (OpenAI's CreateResponse, Response, its output items and stream
events), defined once, and the translation of a request into the chat pipeline's terms:
messages for the model's chat template, a ToolUse, GenerationOptions.

Parameters that only OpenAI can honour (hosted tools, background runs, reasoning settings,
prompt templates, conversations) are declared so that using them is a 400 naming them.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from vllm_obtain.api.errors import InvalidRequestError
from vllm_obtain.api.protocol import (
    OMIT_IF_NONE,
    FunctionDefinition,
    FunctionName,
    JsonSchemaFormat,
    RequestModel,
    json_or_text,
)
from vllm_obtain.contract import JsonOutput, SamplingParams
from vllm_obtain.core.planning import GenerationOptions
from vllm_obtain.core.tools import ToolUse


def new_id(prefix: str) -> str:
    """An id nobody can guess (48 hex digits of randomness), as `resp_...`, `msg_...`."""
    return f"{prefix}_{secrets.token_hex(24)}"


# --- requests ------------------------------------------------------------------------------


class InputText(RequestModel):
    type: Literal["input_text", "output_text"]  # output_text: an earlier answer given back
    text: str


class NonTextInput(RequestModel, extra="allow"):
    type: Literal["input_image", "input_file", "input_audio", "refusal"]


ContentPart = Annotated[InputText | NonTextInput, Field(discriminator="type")]


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(RequestModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class OtherItem(RequestModel, extra="allow"):
    """An item only OpenAI's own models produce (reasoning, hosted tool calls, references)."""

    type: str


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | OtherItem,
    Field(union_mode="left_to_right"),
]


class FunctionTool(FunctionDefinition):
    """Chat's function definition with its type beside it (the Responses API's tool shape)."""

    type: Literal["function"]


class HostedTool(RequestModel, extra="allow"):
    """web_search, file_search, code_interpreter, computer_use, image_generation, mcp..."""

    type: str


Tool = Annotated[FunctionTool | HostedTool, Field(union_mode="left_to_right")]


class FunctionChoice(RequestModel):
    type: Literal["function"]
    name: FunctionName


class OtherChoice(RequestModel, extra="allow"):
    type: str


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[FunctionChoice | OtherChoice, Field(union_mode="left_to_right")]
)


class TextFormat(RequestModel):
    type: Literal["text"]


class JsonObjectFormat(RequestModel):
    type: Literal["json_object"]


class ResponsesJsonSchemaFormat(JsonSchemaFormat):
    """Chat's json_schema format, flattened: name, schema and strict sit beside the type (and
    the schema is required)."""

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class TextParam(RequestModel):
    format: Annotated[
        TextFormat | JsonObjectFormat | ResponsesJsonSchemaFormat, Field(discriminator="type")
    ] = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["medium"] | None = None  # what this server's models write

    def json_output(self) -> JsonOutput | None:
        fmt = self.format
        if isinstance(fmt, TextFormat):
            return None
        if isinstance(fmt, JsonObjectFormat) or fmt.json_schema is None:
            return JsonOutput(param="text.format")
        return JsonOutput(json.dumps(fmt.json_schema), param="text.format")


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


class CreateResponseRequest(RequestModel):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=16)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool | None = None
    service_tier: Literal["auto", "default"] | None = None
    # Declared so that asking for them is a clear 400 (unsupported_param), not a silent no-op.
    include: list[str] | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    context_management: list[Any] | None = None
    moderation: dict[str, Any] | None = None

    def unsupported_param(self) -> str | None:
        """The first param asking for what only OpenAI's service does."""
        for tool in self.tools or ():
            if isinstance(tool, HostedTool):
                return "tools"
        if isinstance(self.tool_choice, OtherChoice):
            return "tool_choice"
        if self.include:
            return "include"
        if self.background:
            return "background"
        if self.reasoning and any(value is not None for value in self.reasoning.values()):
            return "reasoning"
        if self.top_logprobs:
            return "top_logprobs"
        for name in ("prompt", "conversation", "context_management", "moderation"):
            if getattr(self, name) is not None:
                return name
        return None

    def unsupported_message(self, param: str) -> str:
        if param == "tools":
            hosted = next(t.type for t in self.tools or () if isinstance(t, HostedTool))
            return (
                f"The '{hosted}' tool is hosted by OpenAI and not available on this server; "
                "only function tools are."
            )
        return f"'{param}' is not supported by this server."

    def to_options(self) -> GenerationOptions:
        return GenerationOptions(
            sampling=SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
            ),
            max_tokens=self.max_output_tokens,
            json_output=self.text.json_output() if self.text else None,
        )

    def tool_use(self) -> ToolUse:
        choice = self.tool_choice
        return ToolUse(
            tools=tuple(
                {
                    "type": "function",
                    "function": t.model_dump(exclude={"type", "strict"}, exclude_none=True),
                }
                for t in self.tools or ()
                if isinstance(t, FunctionTool)
            ),
            choice=choice if isinstance(choice, str) else None,
            function=choice.name if isinstance(choice, FunctionChoice) else None,
            parallel=self.parallel_tool_calls,
        )

    def input_items(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


def conversation_of(items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat messages for the model's template: function calls join the
    assistant message before them, their outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    for position, item in enumerate(items):
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text_of(item.content, position)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": json_or_text(item.arguments)},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            content = _text_of(item.output, position)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
        else:
            raise InvalidRequestError(
                f"Input items of type '{item.type}' are not supported by this server: send "
                "messages, function_call and function_call_output items.",
                param=f"input.[{position}].type",
            )
    return messages


def _text_of(content: str | list[ContentPart], position: int) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if isinstance(part, NonTextInput):
            kind = part.type.removeprefix("input_")
            raise InvalidRequestError(
                f"This model reads text only: '{part.type}' parts ({kind}) are not supported.",
                param=f"input.[{position}].content",
                code="unsupported",
            )
    return "".join(part.text for part in content if isinstance(part, InputText))


def input_item_resources(items: list[InputItem]) -> list[dict[str, Any]]:
    """The input items as GET /v1/responses/{id}/input_items lists them, each with an id."""
    resources: list[dict[str, Any]] = []
    for position, item in enumerate(items):
        if isinstance(item, MessageItem):
            text = _text_of(item.content, position)
            part_type = "output_text" if item.role == "assistant" else "input_text"
            part: dict[str, Any] = {"type": part_type, "text": text}
            if item.role == "assistant":
                part |= {"annotations": [], "logprobs": []}
            resources.append(
                {
                    "id": new_id("msg"),
                    "type": "message",
                    "role": item.role,
                    "status": "completed",
                    "content": [part],
                }
            )
        elif isinstance(item, FunctionCallItem):
            resources.append({"id": new_id("fc"), "status": "completed", **item.model_dump()})
        elif isinstance(item, FunctionCallOutputItem):
            output = _text_of(item.output, position)
            resources.append(
                {
                    "id": new_id("fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": output,
                    "status": "completed",
                }
            )
    return resources


# --- the response --------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallOutput(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | FunctionCallOutput


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: None = None
    service_tier: Literal["default"] = "default"
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["auto", "disabled"]
    usage: Annotated[ResponseUsage | None, OMIT_IF_NONE] = None  # known once it has ended
    user: Annotated[str | None, OMIT_IF_NONE] = None
    metadata: dict[str, str]
    background: bool = False


def response_skeleton(
    body: CreateResponseRequest, *, model: str, store: bool, created_at: int
) -> Response:
    """The response as it starts, echoing the request's settings."""
    choice = body.tool_choice
    return Response(
        id=new_id("resp"),
        created_at=created_at,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=model,
        output=[],
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        store=store,
        temperature=1.0 if body.temperature is None else body.temperature,
        text=(body.text or TextParam()).model_dump(by_alias=True, exclude_none=True),
        tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
        tools=[t.model_dump() for t in body.tools or ()],
        top_p=1.0 if body.top_p is None else body.top_p,
        truncation=body.truncation or "disabled",
        user=body.user,
        metadata=dict(body.metadata or {}),
    )


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True


class ResponseItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str
    last_id: str
    has_more: bool


# --- stream events -------------------------------------------------------------------------


class ResponseEvent(BaseModel):
    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    """response.created, .in_progress, .completed, .incomplete, .failed"""

    response: Response


class OutputItemEvent(ResponseEvent):
    """response.output_item.added and .done"""

    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    """response.content_part.added and .done"""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(ResponseEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str
