"""Sampling every sequence of a decoding step at once.

Most requests ask only for a temperature and a top_p (or greedy decoding): their rows of the
step's logits are sampled together in a few numpy calls (argmax for greedy rows; softmax,
nucleus cut and one inverse-CDF draw per sampled row), with a random generator per sequence, so
a seeded request's draws do not depend on which other requests share its steps. A request that
needs more (penalties, logit_bias, a JSON grammar, logprobs) keeps its own llama.cpp sampler
chain (sampling.SequenceSampler) and is sampled on its own row.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vllm_obtain.contract import GenerationRequest, TokenLogprob

# Top-p keeps the most likely tokens until their mass reaches top_p. The tokens within these
# factors of the most likely one nearly always hold that mass, and they are all a model
# rarely offers more than a few hundred of: only they are sorted, the whole row only if not.
NUCLEUS_FLOORS = (1e-4, 1e-8)
# An inverse-CDF draw sums the row in blocks first, then runs a cumulative sum over one block
# only: a cumulative sum over a 50k-token row costs ten times the rest of the draw.
CDF_BLOCK = 1024


class RowSampler(Protocol):
    """Picks one sequence's next token from its row of the step's logits, on its own."""

    last_logprob: TokenLogprob | None  # of the last sampled token, when the request asked

    def sample(self, ctx: Any, index: int) -> int: ...

    def close(self) -> None: ...


@dataclass
class PlainSampler:
    """Temperature and top_p only: sampled with the step's other plain rows."""

    temperature: float
    top_p: float
    rng: np.random.Generator = field(repr=False)
    last_logprob: TokenLogprob | None = None  # never asked for: logprobs take the chain

    @classmethod
    def for_request(cls, request: GenerationRequest) -> PlainSampler:
        sampling = request.sampling
        # No seed: a fresh random one, so unseeded requests differ, across restarts too.
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(64)
        return cls(sampling.temperature, sampling.top_p, np.random.default_rng(seed & (2**64 - 1)))

    def close(self) -> None:
        pass


Sampler = PlainSampler | RowSampler


def is_plain(request: GenerationRequest) -> bool:
    """Whether the batched path can sample this request: nothing but temperature and top_p."""
    s = request.sampling
    return (
        request.json_output is None
        and request.logprobs is None
        and not s.logit_bias
        and not s.presence_penalty
        and not s.frequency_penalty
    )


@dataclass(frozen=True, slots=True)
class Pick:
    """One row to sample in a step: whose sampler, its batch index, its row of the logits."""

    sampler: Sampler
    index: int  # in the llama_batch (what llama.cpp's per-row samplers take)
    row: int  # in the step's logits matrix: the order among the batch entries with logits


StepSampler = Callable[[Any, Sequence[Pick]], list[int]]


def nucleus(probs: Any, top_p: float) -> Any:
    """Indices of the smallest set of most likely tokens whose probability reaches top_p,
    most likely first (`probs` need not be normalised)."""
    total = float(probs.sum())
    for floor in NUCLEUS_FLOORS:
        # All tokens above the floor: a prefix of the row sorted by probability.
        head = np.flatnonzero(probs >= probs.max() * floor)
        head = head[np.argsort(-probs[head], kind="stable")]
        mass = np.cumsum(probs[head], dtype=np.float64) / total
        if mass[-1] >= top_p:
            break
    else:
        head = np.argsort(-probs, kind="stable")
        mass = np.cumsum(probs[head], dtype=np.float64) / total
    keep = int(np.searchsorted(mass, top_p, side="left")) + 1
    return head[: min(keep, head.size)]


def draw_rows(weights: Any, us: Any) -> Any:
    """For every row i of `weights` (rows x vocabulary), an index j with probability
    weights[i, j] / sum(weights[i]), for us[i] uniform in [0, 1)."""
    rows, size = weights.shape
    starts = np.arange(0, size, CDF_BLOCK)
    cumulative = np.cumsum(np.add.reduceat(weights, starts, axis=1, dtype=np.float64), axis=1)
    targets = us * cumulative[:, -1]
    blocks = np.minimum((cumulative <= targets[:, None]).sum(axis=1), starts.size - 1)
    before = np.where(blocks > 0, cumulative[np.arange(rows), blocks - 1], 0.0)
    columns = starts[blocks][:, None] + np.arange(CDF_BLOCK)[None, :]
    inside = columns < size
    picked = np.take_along_axis(weights, np.minimum(columns, size - 1), axis=1)
    inner = np.cumsum(np.where(inside, picked, 0.0), axis=1, dtype=np.float64)
    offsets = np.minimum((inner <= (targets - before)[:, None]).sum(axis=1), CDF_BLOCK - 1)
    return np.minimum(starts[blocks] + offsets, size - 1)


def draw(weights: Any, u: float) -> int:
    """Index i with probability weights[i] / sum(weights), for u uniform in [0, 1)."""
    return int(draw_rows(weights[None, :], np.array([u]))[0])


def sample_plain(logits: Any, samplers: Sequence[PlainSampler], work: Any = None) -> list[int]:
    """One token per row of `logits` (rows x vocabulary, float32), row i by samplers[i].
    `work`, a float32 array of at least as many rows, is reused for the probabilities: a new
    one every step costs more than the sampling (the kernel maps and zeroes its pages anew)."""
    tokens = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.temperature == 0]
    if greedy:
        for i, token in zip(greedy, logits[greedy].argmax(axis=1).tolist(), strict=True):
            tokens[i] = token
    drawn = [i for i, s in enumerate(samplers) if s.temperature != 0]
    if not drawn:
        return tokens
    if work is None:
        work = np.empty((len(drawn), logits.shape[1]), dtype=np.float32)
    probs = work[: len(drawn)]
    np.take(logits, drawn, axis=0, out=probs)
    temperatures = np.array([samplers[i].temperature for i in drawn], dtype=np.float32)
    np.divide(probs, temperatures[:, None], out=probs)
    np.subtract(probs, probs.max(axis=1, keepdims=True), out=probs)
    np.exp(probs, out=probs)
    # One uniform number per row and step, drawn in row order from each sequence's generator.
    us = np.array([samplers[i].rng.random() for i in drawn])
    whole = [row for row, i in enumerate(drawn) if samplers[i].top_p >= 1.0]
    if len(whole) == len(drawn):
        chosen = draw_rows(probs, us).tolist()
    elif whole:
        chosen = draw_rows(probs[whole], us[whole]).tolist()
    else:
        chosen = []
    for row, token in zip(whole, chosen, strict=True):
        tokens[drawn[row]] = token
    for row, i in enumerate(drawn):
        if samplers[i].top_p < 1.0:
            kept = nucleus(probs[row], samplers[i].top_p)
            tokens[i] = int(kept[draw(probs[row][kept], us[row])])
    return tokens


def step_sampler(lib: Any, n_vocab: int) -> StepSampler:
    """Samples a step's picks on a llama.cpp context: the plain rows together from the logits
    matrix, the others each through its own sampler chain."""

    work = np.empty((0, n_vocab), dtype=np.float32)  # grows to the most rows a step has had

    def sample(ctx: Any, picks: Sequence[Pick]) -> list[int]:
        nonlocal work
        tokens = [0] * len(picks)
        plain = [k for k, p in enumerate(picks) if isinstance(p.sampler, PlainSampler)]
        if plain:
            rows = max(picks[k].row for k in plain) + 1
            if work.shape[0] < len(plain):
                work = np.empty((len(plain), n_vocab), dtype=np.float32)
            matrix = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(rows, n_vocab))
            wanted = [picks[k].row for k in plain]
            chosen = sample_plain(
                matrix if wanted == list(range(rows)) else matrix[wanted],
                [picks[k].sampler for k in plain],  # type: ignore[misc]  # plain ones only
                work,
            )
            for k, token in zip(plain, chosen, strict=True):
                tokens[k] = token
        for k, pick in enumerate(picks):
            if not isinstance(pick.sampler, PlainSampler):
                tokens[k] = pick.sampler.sample(ctx, pick.index)
        return tokens

    return sample


def sample_each(ctx: Any, picks: Sequence[Pick]) -> list[int]:
    """Every pick on its own sampler: for samplers that all sample their own rows."""
    tokens = []
    for pick in picks:
        assert not isinstance(pick.sampler, PlainSampler)
        tokens.append(pick.sampler.sample(ctx, pick.index))
    return tokens
