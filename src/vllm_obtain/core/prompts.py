"""Fitting a prompt and its completion into the model's context: pure checks, no engine."""

from __future__ import annotations


class PromptError(ValueError):
    """The prompt cannot be served as asked; `param` names the request field at fault."""

    def __init__(self, message: str, *, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


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
        raise PromptError("The prompt is empty.", param=prompt_param)
    if max_prompt_tokens and prompt_tokens > max_prompt_tokens:
        raise PromptError(
            f"This server accepts prompts of at most {max_prompt_tokens} tokens. However, your "
            f"prompt has {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="prompt_too_long",
        )
    if max_tokens_cap and requested is not None and requested > max_tokens_cap:
        raise PromptError(
            f"max_tokens is too large: {requested}. This server generates at most "
            f"{max_tokens_cap} tokens per completion.",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    if prompt_tokens >= context_length:
        raise PromptError(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt has {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = context_length - prompt_tokens
    if requested is None:
        return min(room, max_tokens_cap) if max_tokens_cap else room
    if requested > room:
        raise PromptError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
            f"{prompt_param}, {requested} in the completion). Please reduce the length of the "
            f"{prompt_param} or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def check_token_ids(tokens: list[int], vocab_size: int, *, prompt_param: str) -> None:
    """Token-id prompts must name tokens that exist: engines crash or fail on the rest."""
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise PromptError(
            f"Token id {bad} is out of range: this model's vocabulary has {vocab_size} tokens.",
            param=prompt_param,
        )
