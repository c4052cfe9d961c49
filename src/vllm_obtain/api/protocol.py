"""OpenAI request and response models, defined once (field names and shapes as in OpenAI's spec).

Requests are strict: a wrong type is a 400 naming the param, never a silent coercion. Fields that
OpenAI defines but this server does not implement yet are declared, so that using them is a clear
400 (see `unsupported_param`) rather than being silently ignored. Unknown fields are ignored, as
clients (LangChain, n8n, Dify) send vendor extras.

Each request is translated here, once, into the core's engine-neutral terms (`to_options`,
`tool_use`); nothing past the route sees these models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vllm_obtain.contract import JsonOutput, SamplingParams
from vllm_obtain.core.planning import GenerationOptions
from vllm_obtain.core.tools import ToolUse


def _is_none(value: object) -> bool:
    return value is None


# Marks an optional field that is left out of the JSON when None (as opposed to a required
# nullable field such as `finish_reason`, which is always written, as null if need be).
OMIT_IF_NONE = Field(exclude_if=_is_none)


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        """OpenAI's spec marks most optional params nullable, and clients send null for
        "unset" (`n: null`, `stream: null`): an optional param given as null gets its default."""
        if not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in cls.model_fields or _admits_null(cls, key)
        }


def _admits_null(model: type[BaseModel], name: str) -> bool:
    """Whether the field takes null as a value of its own (else null means its default; a
    required field keeps the null, to be refused)."""
    field = model.model_fields[name]
    return field.is_required() or type(None) in get_args(field.annotation)


# --- requests ------------------------------------------------------------------------------


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class NonTextPart(RequestModel, extra="allow"):
    """An image, audio or file: declared so that it is refused by name (the models served
    here read text)."""

    type: Literal["image_url", "input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | NonTextPart, Field(discriminator="type")]


class StreamOptions(RequestModel):
    include_usage: bool = False


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(RequestModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_json_schema(schema)
        return schema


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(RequestModel):
    name: FunctionName


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionRef


class CalledFunction(RequestModel):
    name: str
    arguments: str


class MessageToolCall(RequestModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # on assistant messages
    tool_call_id: str | None = None  # on tool messages

    @field_validator("content")
    @classmethod
    def _text_content(
        cls, content: str | list[ContentPart] | None, info: ValidationInfo
    ) -> str | list[ContentPart] | None:
        role = info.data.get("role")
        if content is None and role != "assistant":  # only an answer with tool calls has none
            raise ValueError(f"a {role} message needs content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, NonTextPart):
                raise ValueError(
                    f"this model reads text only: '{part.type}' parts are not supported"
                )
        return content

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: a plain string `content`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content if isinstance(part, TextPart))
        # "developer" is OpenAI's newer name for "system"; model templates only know the latter.
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Hugging Face templates expect the arguments as a mapping, not JSON text.
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": json_or_text(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        return message


def json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_json_schema(schema: dict[str, Any]) -> None:
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"invalid JSON schema: {exc.message}") from exc


StopParam = str | Annotated[list[str], Field(max_length=16)] | None


class JsonSchemaFormat(RequestModel):
    name: Annotated[str, Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    # `schema` would shadow a BaseModel method; the JSON key is still "schema".
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_is_valid(self) -> JsonSchemaFormat:
        if self.json_schema is not None:
            check_json_schema(self.json_schema)
        return self


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs 'json_schema'")
        return self

    def json_output(self) -> JsonOutput | None:
        """The constraint this format puts on the output; None for plain text."""
        if self.type == "text":
            return None
        schema = self.json_schema.json_schema if self.json_schema is not None else None
        if schema is None:  # json_object, or a json_schema without a schema: any object
            return JsonOutput()
        return JsonOutput(json.dumps(schema))


class SamplingFields(RequestModel):
    """Parameters shared by chat and text completions."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: StopParam = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extension shared with vLLM and llama.cpp's server: generate exactly max_tokens tokens.
    ignore_eos: bool = False
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_as_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None and not all(key.isdigit() for key in bias):
            raise ValueError("logit_bias keys must be token ids")
        return bias

    def to_options(self) -> GenerationOptions:
        """The request in engine-neutral terms."""
        return GenerationOptions(
            sampling=self.sampling_params(),
            max_tokens=self.token_limit,
            n=self.n,
            stop=tuple(self.stop_strings()),
            logprobs=self.logprobs_count(),
            json_output=self.json_output(),
        )

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logit_bias=tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items())),
        )

    @property
    def token_limit(self) -> int | None:
        """The most tokens the client lets the completion have; None: no limit given."""
        return None

    def json_output(self) -> JsonOutput | None:
        """The JSON the output must be, if the request constrains it."""
        return None

    def logprobs_count(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs at all."""
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported_param(self) -> str | None:
        """The first param whose requested behaviour this server does not implement."""
        return None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def json_output(self) -> JsonOutput | None:
        return self.response_format.json_output() if self.response_format else None

    def messages_for_template(self) -> list[dict[str, Any]]:
        return [message.for_template() for message in self.messages]

    def tool_use(self) -> ToolUse:
        choice = self.tool_choice
        return ToolUse(
            tools=tuple(tool.model_dump(exclude_none=True) for tool in self.tools or ()),
            choice=None if isinstance(choice, NamedToolChoice) else choice,
            function=choice.function.name if isinstance(choice, NamedToolChoice) else None,
            parallel=self.parallel_tool_calls,
        )

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")  # as OpenAI says
        return top

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptParam = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptParam | None  # null: OpenAI's default, a new document's start
    max_tokens: Annotated[int, Field(ge=1)] = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: int | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self, document_start: str = "") -> list[str | list[int]]:
        """The prompt param as a list of prompts, each text or token ids; a null prompt is
        `document_start` (OpenAI's default: generate as from a new document's start)."""
        prompt = self.prompt
        if prompt is None:
            return [document_start]
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [[p for p in prompt if isinstance(p, int)]]
        return [p for p in prompt if not isinstance(p, int)]

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def unsupported_param(self) -> str | None:
        if self.echo and self.logprobs is not None:
            return "echo"  # would need the prompt's logprobs, which no engine here reports
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported_param()


EmbeddingInput = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[
        list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=2048)
    ]
)


class EmbeddingRequest(RequestModel):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The input param as a list: texts, or token id lists."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if all(isinstance(item, int) for item in given):
            return [[item for item in given if isinstance(item, int)]]
        return [item for item in given if not isinstance(item, int)]


# --- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: Annotated[list[ResponseToolCall] | None, OMIT_IF_NONE] = None


class FunctionDelta(BaseModel):
    name: Annotated[str | None, OMIT_IF_NONE] = None
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: Annotated[str | None, OMIT_IF_NONE] = None
    type: Annotated[Literal["function"] | None, OMIT_IF_NONE] = None
    function: FunctionDelta


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Annotated[Literal["assistant"] | None, OMIT_IF_NONE] = None
    content: Annotated[str | None, OMIT_IF_NONE] = None
    tool_calls: Annotated[list[ToolCallDelta] | None, OMIT_IF_NONE] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Annotated[Usage | None, OMIT_IF_NONE] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion; streamed as a series of these, with the same id."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Annotated[Usage | None, OMIT_IF_NONE] = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI sends


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # vLLM's field: the tokens one request may hold here (prompt and answer), which the KV
    # cache and the memory budget may make less than the model's own context; null: unknown.
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
