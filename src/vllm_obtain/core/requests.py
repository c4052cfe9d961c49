"""Engine-neutral requests and events: plain data that can cross a thread or a process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is picked; OpenAI's defaults (temperature 1, top_p 1, no penalties)."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # Keep generating past end-of-sequence: fixed-length output for benchmarks (as vLLM's and
    # llama.cpp's own servers offer).
    ignore_eos: bool = False
    # (token id, bias) pairs added to the logits before sampling, as OpenAI's logit_bias.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class JsonOutput:
    """Constrain the output to JSON: any JSON object, or a value valid against `schema` (a JSON
    Schema, as JSON text so that it crosses a process and keys a grammar cache as is)."""

    schema: str | None = None
    param: str = "response_format"  # the request field it came from, for errors


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: the prompt already tokenized, a hard cap on new tokens."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    json_output: JsonOutput | None = None
    # Report each generated token's log-probability and this many most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives
    at its place (bytes, as a token may hold part of a UTF-8 character)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """What an engine emits per step: new tokens and their bytes, and why it stopped if it did.

    `piece` is raw bytes because a token may end in the middle of a UTF-8 character; the text
    layer (core.textstream) decides when the text is whole.
    """

    token_ids: tuple[int, ...]
    piece: bytes
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids, when asked for


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the rest of the server needs to know about a loaded model."""

    context_length: int
    vocab_size: int
    chat_template: str | None
    bos_token: str
    eos_token: str


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """Text ready for the client, for one choice: the unit response shaping works on."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens behind this text, when asked for
