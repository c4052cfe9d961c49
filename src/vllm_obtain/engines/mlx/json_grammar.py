"""JSON output for the MLX engine: an mlx-lm logits processor driven by llguidance (the
grammar engine behind guidance and one of vLLM's structured-output backends).

llguidance's own MLX helper is a Metal kernel; masking with `mx.where` works on every MLX
backend, the CPU one included.

Whitespace is bounded as llama.cpp's JSON grammars bound it: llguidance's default allows any run
of spaces, tabs and newlines between items, and a small model would pad with them until
max_tokens. Every JSON value the schema allows can still be written, compactly or spaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_obtain.contract import EngineRequestError, JsonOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# OpenAI's json_object: any JSON object.
ANY_OBJECT = '{"type": "object"}'

# At most one space on either side of each `,` and `:`, none elsewhere (`{"a": 1, "b": [2]}`
# and `{"a":1,"b":[2]}` pass; `{"a": 1,\n\t\t"b"...` does not). Overrides, so that a schema's
# own "x-guidance" cannot lift the bound. Not `whitespace_pattern`: llguidance 1.7 repeats it,
# so even " " lets a run of spaces through.
BOUNDED_WHITESPACE: JsonCompileOptions = {
    "whitespace_flexible": False,
    "whitespace_pattern": None,
    "item_separator": r"\x20?,\x20?",
    "key_separator": r"\x20?:\x20?",
}


class JsonGrammars:
    """Compiles JSON constraints against one model's tokenizer (built once: it indexes the
    whole vocabulary)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int]) -> None:
        from llguidance.hf import from_tokenizer

        self._tokenizer = from_tokenizer(hf_tokenizer, eos_token=eos_token_ids[0])

    def processor(self, json_output: JsonOutput) -> JsonLogitsProcessor:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(
            json_output.schema or ANY_OBJECT, overrides=BOUNDED_WHITESPACE
        )
        matcher = LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise EngineRequestError(
                f"this JSON schema cannot be enforced: {matcher.get_error()}",
                param=json_output.param,
            )
        return JsonLogitsProcessor(matcher, self._tokenizer.vocab_size)


class JsonLogitsProcessor:
    """Masks every token the JSON does not allow next. mlx-lm calls it once per step with the
    tokens so far: the prompt on the first call, then ending with the token just sampled."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        if self._started:
            self._matcher.consume_token(int(tokens.reshape(-1)[-1].item()))
        self._started = True
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        vocab = logits.shape[-1]
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").astype(bool)
        # The model's output layer may be padded past the tokenizer's vocabulary: never those.
        allowed = np.pad(allowed, (0, max(0, vocab - allowed.size)))[:vocab]
        return mx.where(mx.array(allowed), logits, -mx.inf)
