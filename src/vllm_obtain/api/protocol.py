"""OpenAI request and response models, defined once (field names and shapes as in OpenAI's spec).

Requests are strict: a wrong type is a 400 naming the param, never a silent coercion. Fields that
OpenAI defines but this server does not implement yet are declared, so that using them is a clear
400 (see `unsupported_param`) rather than being silently ignored. Unknown fields are ignored, as
clients (LangChain, n8n, Dify) send vendor extras.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vllm_obtain.core.requests import SamplingParams


def _is_none(value: object) -> bool:
    return value is None


# Marks an optional field that is left out of the JSON when None (as opposed to a required
# nullable field such as `finish_reason`, which is always written, as null if need be).
OMIT_IF_NONE = Field(exclude_if=_is_none)


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# --- requests ------------------------------------------------------------------------------


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class StreamOptions(RequestModel):
    include_usage: bool = False


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: a plain string `content`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's newer name for "system"; model templates only know the latter.
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        if self.name is not None:
            message["name"] = self.name
        return message


StopParam = str | Annotated[list[str], Field(max_length=16)] | None


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
    logit_bias: dict[str, float] | None = None

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    def sampling_params_set(self) -> set[str]:
        """The sampling params this request sets to something other than the default."""
        defaults = SamplingParams()
        given = self.sampling_params()
        return {
            name
            for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
                         "ignore_eos")
            if getattr(given, name) != getattr(defaults, name)
        }  # fmt: skip

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported_param(self) -> str | None:
        """The first param whose requested behaviour this server does not implement."""
        if self.logit_bias:
            return "logit_bias"
        return None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported_param(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        return super().unsupported_param()


PromptParam = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptParam
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt param as a list of prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def unsupported_param(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.logprobs is not None:
            return "logprobs"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported_param()


# --- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
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


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
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
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion; streamed as a series of these, with the same id."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Annotated[Usage | None, OMIT_IF_NONE] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


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
