"""How one llama.cpp sequence picks its next token: its own sampler chain, and a grammar when
the output must be JSON (grammar.py makes it).

The grammar is checked last, the way llama.cpp's own server does it: sample as usual, and only
if the token breaks the grammar, sample again with the grammar applied to the whole vocabulary.
Applying a grammar to every one of 49k tokens at every step costs over ten times the decoding;
most sampled tokens already fit.
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import numpy as np

from vllm_obtain.contract import EngineRequestError, GenerationRequest, TokenLogprob
from vllm_obtain.engines.llama_cpp.grammar import gbnf_for

# OpenAI's penalties count the text generated so far; llama.cpp looks back a fixed window.
PENALTY_WINDOW = 64
# llama.cpp reserves this seed value for "pick a random seed".
_LLAMA_RANDOM_SEED = 0xFFFFFFFF


def client_seed_to_llama(seed: int | None, fallback: int) -> int:
    """Map an OpenAI seed (any int64, or none) to llama.cpp's uint32 sampler seed."""
    value = (fallback if seed is None else seed) & 0xFFFFFFFF
    return value - 1 if value == _LLAMA_RANDOM_SEED else value


def log_softmax(logits: Any) -> Any:
    """The model's log-probabilities (before temperature, penalties or bias, as vLLM reports)."""
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class SequenceSampler:
    """The sampler of one running request."""

    def __init__(
        self,
        lib: Any,
        internals: Any,
        vocab: Any,
        request: GenerationRequest,
        pieces: list[bytes],
    ) -> None:
        self._lib, self._pieces, self._top = lib, pieces, request.logprobs
        self.last_logprob: TokenLogprob | None = None  # of the last sampled token, if asked
        n_vocab = lib.llama_vocab_n_tokens(vocab)
        self._chain = self._make_chain(internals, request, n_vocab)
        self._grammar: Any = None
        self._candidates: Any = None
        if request.json_output is not None:
            grammar = gbnf_for(request.json_output).encode()
            self._grammar = lib.llama_sampler_init_grammar(vocab, grammar, b"root")
            if not self._grammar:  # llama.cpp could not parse it; it logged why
                self.close()
                raise EngineRequestError(
                    "llama.cpp cannot build a grammar from this JSON schema.",
                    param=request.json_output.param,
                )
            self._candidates = internals.LlamaTokenDataArray(n_vocab=n_vocab)

    @staticmethod
    def _make_chain(internals: Any, request: GenerationRequest, n_vocab: int) -> Any:
        sampling = request.sampling
        chain = internals.LlamaSampler()
        if sampling.logit_bias:
            chain.add_logit_bias(n_vocab, dict(sampling.logit_bias))
        if sampling.presence_penalty or sampling.frequency_penalty:
            chain.add_penalties(
                n_vocab,
                PENALTY_WINDOW,
                1.0,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            )
        if sampling.temperature == 0:
            chain.add_greedy()
        else:
            chain.add_top_p(sampling.top_p, 1)
            chain.add_temp(sampling.temperature)
            # No seed: a fresh random one, so unseeded requests differ, across restarts too.
            chain.add_dist(client_seed_to_llama(sampling.seed, random.getrandbits(32)))
        return chain

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits of batch row `index`; the samplers' state moves on."""
        lib = self._lib
        if self._top is not None:  # before sampling: some samplers modify the logits in place
            self.last_logprob = None
            row = lib.llama_get_logits_ith(ctx, index)
            log_probs = log_softmax(np.ctypeslib.as_array(row, shape=(len(self._pieces),)))
        token = self._sample(ctx, index)
        if self._top is not None:
            self.last_logprob = self._logprob(log_probs, token)
        return token

    def _sample(self, ctx: Any, index: int) -> int:
        lib = self._lib
        if self._grammar is None:
            return int(lib.llama_sampler_sample(self._chain.sampler, ctx, index))
        chain = self._chain.sampler
        logits = np.ctypeslib.as_array(
            lib.llama_get_logits_ith(ctx, index), shape=(self._candidates.n_vocab,)
        )
        token = self._pick(chain, logits, grammar_first=False)
        if not self._grammar_allows(token):
            token = self._pick(chain, logits, grammar_first=True)
        lib.llama_sampler_accept(self._grammar, token)
        lib.llama_sampler_accept(chain, token)
        return token

    def _logprob(self, log_probs: Any, token: int) -> TokenLogprob:
        top: tuple[tuple[bytes, float], ...] = ()
        if self._top:
            best = np.argpartition(-log_probs, self._top)[: self._top]
            best = best[np.argsort(-log_probs[best])]
            top = tuple((self._pieces[t], float(log_probs[t])) for t in best)
        return TokenLogprob(self._pieces[token], float(log_probs[token]), top)

    def _pick(self, chain: Any, logits: Any, *, grammar_first: bool) -> int:
        candidates = self._candidates
        candidates.copy_logits(logits)
        array = ctypes.byref(candidates.candidates)
        if grammar_first:
            self._lib.llama_sampler_apply(self._grammar, array)
        self._lib.llama_sampler_apply(chain, array)
        return int(candidates.candidates_data.id[candidates.candidates.selected])

    def _grammar_allows(self, token: int) -> bool:
        lib = self._lib
        data = lib.llama_token_data(id=token, logit=1.0, p=0.0)
        single = lib.llama_token_data_array(
            data=ctypes.pointer(data), size=1, selected=-1, sorted=False
        )
        lib.llama_sampler_apply(self._grammar, ctypes.byref(single))
        return not math.isinf(single.data[0].logit)

    def close(self) -> None:
        self._chain.close()
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
