"""Sampling all the rows of a decoding step at once: greedy rows, temperature and top_p rows
with a random generator per sequence, and the requests that keep their own sampler chain."""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import Any

import numpy as np
import pytest

from vllm_obtain.contract import GenerationRequest, JsonOutput, SamplingParams, TokenLogprob
from vllm_obtain.engines.llama_cpp.step_sampling import (
    Pick,
    PlainSampler,
    is_plain,
    nucleus,
    sample_plain,
    step_sampler,
)

VOCAB = 8


def plain(temperature: float = 1.0, top_p: float = 1.0, seed: int | None = 1) -> PlainSampler:
    return PlainSampler.for_request(
        GenerationRequest("r", (1,), 4, SamplingParams(temperature, top_p, seed=seed))
    )


def logits_for(probabilities: list[float]) -> np.ndarray:
    return np.log(np.array(probabilities, dtype=np.float32))


def test_greedy_rows_take_their_own_argmax() -> None:
    rows = np.array([[0, 3, 1, 2], [5, 1, 1, 1], [0, 0, 0, 9]], dtype=np.float32)
    assert sample_plain(rows, [plain(0), plain(0), plain(0)]) == [1, 0, 3]


def test_sampled_tokens_follow_the_softmax_of_the_scaled_logits() -> None:
    row = logits_for([0.7, 0.2, 0.1, 1e-9])
    sampler = plain(1.0, seed=3)
    counts = Counter(sample_plain(row[None, :], [sampler])[0] for _ in range(4000))
    assert abs(counts[0] / 4000 - 0.7) < 0.03
    assert abs(counts[1] / 4000 - 0.2) < 0.03
    assert abs(counts[2] / 4000 - 0.1) < 0.03
    assert counts[3] == 0
    # Temperature 0.5 squares the odds: 0.49 : 0.04 : 0.01 -> 0.907, 0.074, 0.019.
    cold = plain(0.5, seed=4)
    counts = Counter(sample_plain(row[None, :], [cold])[0] for _ in range(4000))
    assert abs(counts[0] / 4000 - 0.907) < 0.03


def test_top_p_never_picks_outside_the_nucleus() -> None:
    probabilities = [0.5, 0.3, 0.15, 0.05]
    assert sorted(nucleus(np.array(probabilities), 0.8).tolist()) == [0, 1]
    assert sorted(nucleus(np.array(probabilities), 0.81).tolist()) == [0, 1, 2]
    assert nucleus(np.array(probabilities), 0.1).tolist() == [0]
    sampler = plain(1.0, top_p=0.8, seed=5)
    row = logits_for(probabilities)
    picked = Counter(sample_plain(row[None, :], [sampler])[0] for _ in range(2000))
    assert set(picked) == {0, 1}
    assert abs(picked[0] / 2000 - 0.5 / 0.8) < 0.04


def test_a_wide_nucleus_beyond_the_first_sorted_tokens_is_still_exact() -> None:
    flat = np.full(1000, 1.0)  # top_p 0.9 needs 900 tokens, more than the first peek
    assert len(nucleus(flat, 0.9)) == 900


def test_a_seeded_sequence_draws_the_same_tokens_whatever_shares_its_steps() -> None:
    rng = np.random.default_rng(0)
    steps = [rng.normal(size=(3, VOCAB)).astype(np.float32) for _ in range(20)]

    alone = plain(0.8, seed=42)
    beside = [plain(0.8, seed=42), plain(0.8, seed=7), plain(0, seed=None)]
    tokens_alone = [sample_plain(step[:1], [alone])[0] for step in steps]
    tokens_beside = [sample_plain(step, beside)[0] for step in steps]
    assert tokens_alone == tokens_beside

    other_seed = plain(0.8, seed=43)
    assert [sample_plain(step[:1], [other_seed])[0] for step in steps] != tokens_alone


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, True),
        ({"sampling": SamplingParams(0.7, 0.9, seed=3)}, True),
        ({"sampling": SamplingParams(presence_penalty=0.5)}, False),
        ({"sampling": SamplingParams(frequency_penalty=0.5)}, False),
        ({"sampling": SamplingParams(logit_bias=((3, 5.0),))}, False),
        ({"json_output": JsonOutput()}, False),
        ({"logprobs": 0}, False),
    ],
)
def test_only_temperature_and_top_p_requests_take_the_batched_path(
    change: dict[str, Any], expected: bool
) -> None:
    assert is_plain(GenerationRequest("r", (1,), 4, **change)) is expected


class ChainSampler:
    """A request with its own sampler chain: samples its batch row by index."""

    last_logprob: TokenLogprob | None = None

    def __init__(self) -> None:
        self.indices: list[int] = []

    def sample(self, ctx: Any, index: int) -> int:
        self.indices.append(index)
        return 77

    def close(self) -> None:
        pass


class LogitsLib:
    """llama_get_logits over a matrix of our own."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)

    def llama_get_logits(self, ctx: Any) -> Any:
        return self.matrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def test_a_step_samples_plain_rows_from_the_logits_matrix_and_the_rest_on_their_chains() -> None:
    matrix = np.zeros((3, VOCAB), dtype=np.float32)
    matrix[0, 2] = matrix[2, 6] = 10.0
    lib = LogitsLib(matrix)
    chain = ChainSampler()
    picks = [Pick(plain(0), index=0, row=0), Pick(chain, index=5, row=1), Pick(plain(0), 9, 2)]

    assert step_sampler(lib, VOCAB)(object(), picks) == [2, 77, 6]
    assert chain.indices == [5]


def test_drawing_all_rows_at_once_picks_what_drawing_each_row_picks() -> None:
    from vllm_obtain.engines.llama_cpp.step_sampling import CDF_BLOCK, draw, draw_rows

    rng = np.random.default_rng(3)
    size = 3 * CDF_BLOCK + 77  # a last block shorter than the others
    weights = rng.random((6, size)).astype(np.float32) ** 8
    weights[2, :] = 0
    weights[2, size - 1] = 1.0  # all the mass on the very last token
    for u in (0.0, 0.13, 0.5, 0.87, 0.999999):
        us = np.full(6, u)
        assert draw_rows(weights, us).tolist() == [draw(row, u) for row in weights]
    assert draw_rows(weights, np.full(6, 0.5))[2] == size - 1
