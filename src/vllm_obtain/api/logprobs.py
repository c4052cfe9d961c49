"""Token log-probabilities in OpenAI's two shapes: chat's list of entries, and the legacy
completions' parallel arrays."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_obtain.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from vllm_obtain.contract import TokenLogprob

# JSON has no -inf (a token a grammar or a bias ruled out); vLLM reports the same stand-in.
FLOOR = -9999.0


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=_text(entry.token),
                logprob=_value(entry.logprob),
                bytes=list(entry.token),
                top_logprobs=[
                    TopLogprob(token=_text(token), logprob=_value(logprob), bytes=list(token))
                    for token, logprob in entry.top
                ],
            )
            for entry in entries
        ]
    )


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """`text_offset` is where the first token's text starts in the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(_text(entry.token))
    return CompletionLogprobs(
        tokens=[_text(entry.token) for entry in entries],
        token_logprobs=[_value(entry.logprob) for entry in entries],
        top_logprobs=[{_text(t): _value(lp) for t, lp in entry.top} for entry in entries],
        text_offset=offsets,
    )
