"""Request planning and validation, in one place.

The API layer translates an OpenAI request once, at the edge, into GenerationOptions (and, for
chat, messages and a ToolUse). Here they are checked against the model they name (what its
engine implements, its vocabulary, its context, the operator's limits) and made into one
GenerationRequest per choice. Every refusal is a ParamError naming the request field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_obtain.contract import (
    Embedder,
    EmbeddingModelInfo,
    Engine,
    GenerationRequest,
    JsonOutput,
    SamplingParams,
)
from vllm_obtain.core.served_model import ServedModel
from vllm_obtain.core.tools import ToolUse

# The SamplingParams fields an engine must implement when a request sets them.
SAMPLING_FEATURES = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "ignore_eos",
    "logit_bias",
)  # fmt: skip


class ParamError(ValueError):
    """A request the server cannot serve as given; `param` names the request field at fault
    (a 400 for the client)."""

    def __init__(self, message: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class GenerationOptions:
    """What a completion request asks for, in engine-neutral terms."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: all the room the context leaves
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives reported per token; None: no logprobs at all
    json_output: JsonOutput | None = None


@dataclass(frozen=True)
class Plan:
    """One API request made ready to run: a GenerationRequest per choice, with its index."""

    choices: list[tuple[int, GenerationRequest]]
    stops: tuple[str, ...]
    prompt_tokens: int


def requested_features(options: GenerationOptions) -> dict[str, str]:
    """What these options ask of an engine (Engine.supported_params), each with the request
    field it came from: every sampling param set to other than its default, logprobs, and a
    JSON constraint (`response_format` on chat, `text.format` on the Responses API)."""
    defaults = SamplingParams()
    features = {
        name: name
        for name in SAMPLING_FEATURES
        if getattr(options.sampling, name) != getattr(defaults, name)
    }
    if options.logprobs is not None:
        features["logprobs"] = "logprobs"
    if options.json_output is not None:
        param = options.json_output.param
        features["tool_choice" if param == "tool_choice" else "response_format"] = param
    return features


def refuse_unsupported(features: dict[str, str], engine: Engine) -> None:
    """A feature the engine does not implement is refused by name, never silently ignored."""
    lacking = sorted(feature for feature in features if feature not in engine.supported_params)
    if lacking:
        param = features[lacking[0]]
        raise ParamError(
            f"'{param}' is not supported by the {engine.name} engine.",
            param=param,
            code="unsupported",
        )


async def plan_chat(
    model: ServedModel,
    messages: Sequence[Mapping[str, Any]],
    tools: ToolUse,
    options: GenerationOptions,
    *,
    request_id: str,
    truncate: bool = False,
) -> Plan:
    """A chat request: its tools checked and, when a call is forced, made the JSON constraint;
    the conversation rendered with the model's template and tokenized. With `truncate`, the
    oldest turns are dropped until it fits the context (the Responses API's truncation=auto)."""
    features = requested_features(options)
    if tools.forced:  # forcing a call is a JSON constraint of its own
        features.pop("response_format", None)
        features["tool_choice"] = "tool_choice"
    refuse_unsupported(features, model.engine)
    problem = tools.problem(json_format_asked=options.json_output is not None)
    if problem is not None:
        raise ParamError(problem, param="tool_choice")
    if tools.forced:
        options = replace(options, json_output=tools.forced_output())
    prompt = await model.chat_prompt_tokens(messages, tools.offered())
    while truncate and not _fits(model, len(prompt), options.max_tokens):
        shorter = without_oldest_turn(messages)
        if shorter is None:
            break  # nothing left to drop: planning says why it does not fit
        messages = shorter
        prompt = await model.chat_prompt_tokens(messages, tools.offered())
    return plan_choices(model, [prompt], options, request_id=request_id, prompt_param="messages")


def _fits(model: ServedModel, prompt_tokens: int, max_tokens: int | None) -> bool:
    limit = model.limits.max_prompt_tokens
    room = model.loaded_info.context_length - prompt_tokens
    return room >= (max_tokens or 1) and not (limit and prompt_tokens > limit)


def without_oldest_turn(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]] | None:
    """The conversation without its oldest message after the system prompt (and the tool
    results answering it, which make no sense alone); None when only one message is left."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None or sum(m["role"] != "system" for m in messages) <= 1:
        return None
    end = first + 1
    while end < len(messages) and messages[end]["role"] == "tool":
        end += 1
    return [*messages[:first], *messages[end:]]


async def plan_completion(
    model: ServedModel,
    prompts: Sequence[str | list[int]],
    options: GenerationOptions,
    *,
    request_id: str,
) -> Plan:
    """A text completion: each prompt, text or token ids, tokenized as the model wants."""
    refuse_unsupported(requested_features(options), model.engine)
    token_lists = [
        prompt
        if isinstance(prompt, list)
        else await model.engine.tokenize(prompt, add_special=True)
        for prompt in prompts
    ]
    return plan_choices(model, token_lists, options, request_id=request_id, prompt_param="prompt")


def plan_choices(
    model: ServedModel,
    prompts: Sequence[list[int]],
    options: GenerationOptions,
    *,
    request_id: str,
    prompt_param: str,
) -> Plan:
    """One GenerationRequest per choice: prompt p, choice j gets index p * n + j."""
    if not prompts:
        raise ParamError("The prompt is empty.", param=prompt_param)
    info, limits = model.loaded_info, model.limits
    check_logit_bias(options.sampling, info.vocab_size)
    choices = []
    for p, tokens in enumerate(prompts):
        check_token_ids(tokens, info.vocab_size, prompt_param=prompt_param)
        max_tokens = plan_max_tokens(
            len(tokens),
            options.max_tokens,
            info.context_length,
            prompt_param=prompt_param,
            max_prompt_tokens=limits.max_prompt_tokens,
            max_tokens_cap=limits.max_tokens,
        )
        base = GenerationRequest(
            f"{request_id}-{p}",
            tuple(tokens),
            max_tokens,
            options.sampling,
            options.json_output,
            logprobs=options.logprobs,
        )
        choices += [(p * options.n + j, seeded_for_choice(base, j)) for j in range(options.n)]
    return Plan(choices, options.stop, sum(len(tokens) for tokens in prompts))


def seeded_for_choice(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice i of a seeded request uses seed + i: distinct choices, reproducible as a set."""
    seed = request.sampling.seed
    if seed is None or index == 0:
        return replace(request, request_id=f"{request.request_id}-{index}")
    return replace(
        request,
        request_id=f"{request.request_id}-{index}",
        sampling=replace(request.sampling, seed=seed + index),
    )


def plan_max_tokens(
    prompt_tokens: int,
    requested: int | None,
    context_length: int,
    *,
    prompt_param: str,
    max_prompt_tokens: int = 0,
    max_tokens_cap: int = 0,
) -> int:
    """How many tokens may be generated: `requested`, or all the room left when unset.

    Like OpenAI and vLLM, a request that cannot fit is refused rather than silently truncated.
    The operator's caps (0: none) are refused the same way; an unset max_tokens gets the cap.
    """
    if prompt_tokens == 0:
        raise ParamError("The prompt is empty.", param=prompt_param)
    if max_prompt_tokens and prompt_tokens > max_prompt_tokens:
        raise ParamError(
            f"This server accepts prompts of at most {max_prompt_tokens} tokens. However, your "
            f"prompt has {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="prompt_too_long",
        )
    if max_tokens_cap and requested is not None and requested > max_tokens_cap:
        raise ParamError(
            f"max_tokens is too large: {requested}. This server generates at most "
            f"{max_tokens_cap} tokens per completion.",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    if prompt_tokens >= context_length:
        raise ParamError(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt has {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = context_length - prompt_tokens
    if requested is None:
        return min(room, max_tokens_cap) if max_tokens_cap else room
    if requested > room:
        raise ParamError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
            f"{prompt_param}, {requested} in the completion). Please reduce the length of the "
            f"{prompt_param} or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def check_token_ids(tokens: Sequence[int], vocab_size: int, *, prompt_param: str) -> None:
    """Token-id prompts must name tokens that exist: engines crash or fail on the rest."""
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ParamError(
            f"Token id {bad} is out of range: this model's vocabulary has {vocab_size} tokens.",
            param=prompt_param,
        )


def check_logit_bias(sampling: SamplingParams, vocab_size: int) -> None:
    if any(not 0 <= token < vocab_size for token, _ in sampling.logit_bias):
        raise ParamError(
            f"logit_bias names a token id outside the vocabulary (0 to {vocab_size - 1}).",
            param="logit_bias",
        )


async def plan_embedding(
    embedder: Embedder,
    info: EmbeddingModelInfo,
    inputs: Sequence[str | list[int]],
    *,
    dimensions: int | None,
) -> list[list[int]]:
    """The token lists to embed, each text tokenized as the model wants and each list checked
    against the model's vocabulary and input length."""
    if dimensions is not None and dimensions != info.dimensions:
        # Only models trained for it (Matryoshka) keep their meaning when cut short.
        raise ParamError(
            f"This model's embeddings have {info.dimensions} dimensions and cannot be "
            "shortened; leave out 'dimensions'.",
            param="dimensions",
        )
    token_lists = []
    for item in inputs:
        tokens = await embedder.tokenize(item) if isinstance(item, str) else item
        if any(not 0 <= t < info.vocab_size for t in tokens):
            raise ParamError(
                f"input holds a token id outside the vocabulary (0 to {info.vocab_size - 1}).",
                param="input",
            )
        if len(tokens) > info.context_length:
            raise ParamError(
                f"This model's maximum input length is {info.context_length} tokens; an input "
                f"has {len(tokens)}. Split it into shorter chunks.",
                param="input",
                code="context_length_exceeded",
            )
        token_lists.append(tokens)
    return token_lists
