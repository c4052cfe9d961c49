"""The llama.cpp continuous-batching scheduler on a fake C API: admission against the KV pool,
eviction of idle cached slots, prefix reuse, chunked prefill beside decoding, and endings.

FakeLib records what the scheduler asks of llama.cpp (batches, `llama_memory_seq_rm` calls, and
which (seq_id, pos, token) rows went into each `llama_decode`); the samplers follow a script, so
every expected number below is worked out from the scheduler's rules, not from a model.
"""

from __future__ import annotations

from typing import Any

import pytest

from vllm_obtain.contract import (
    EngineRequestError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
)
from vllm_obtain.engines.engine_thread import Job
from vllm_obtain.engines.llama_cpp.scheduler import BatchScheduler

EOS = 0
VOCAB = 100
PIECES = [b"</s>"] + [f"<{t}>".encode() for t in range(1, VOCAB)]
IS_EOG = [t == EOS for t in range(VOCAB)]
FILLER = 5  # what an unscripted sampler produces: never an end-of-generation token

Row = tuple[int, int, int]  # (seq_id, pos, token) of one token in a decode call
Output = TokenChunk | BaseException


class FakeBatch:
    """llama_batch's fields as plain lists."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.n_tokens = 0
        self.token = [-1] * size
        self.pos = [-1] * size
        self.n_seq_id = [0] * size
        self.seq_id = [[-1] for _ in range(size)]
        self.logits = [False] * size


class FakeCtx:
    def __init__(self) -> None:
        self.memory = object()
        self.ctx = object()


class FakeLib:
    """The part of llama_cpp's C API the scheduler calls, recording every call."""

    def __init__(self, ctx: FakeCtx) -> None:
        self._ctx = ctx
        self.batch_inits: list[tuple[int, int, int]] = []
        self.freed: list[FakeBatch] = []
        self.seq_rm: list[tuple[int, int, int]] = []  # (seq_id, p0, p1)
        self.seq_cp: list[tuple[int, int, int, int]] = []  # (src, dst, p0, p1)
        self.decodes: list[list[Row]] = []
        self.logits_rows: list[list[int]] = []  # per decode call: batch indices with logits
        self.fail_next_decode = 0  # a nonzero code: the next llama_decode returns it

    def llama_batch_init(self, n_tokens: int, embd: int, n_seq_max: int) -> FakeBatch:
        self.batch_inits.append((n_tokens, embd, n_seq_max))
        return FakeBatch(n_tokens)

    def llama_batch_free(self, batch: FakeBatch) -> None:
        self.freed.append(batch)

    def llama_memory_seq_rm(self, memory: object, seq_id: int, p0: int, p1: int) -> bool:
        assert memory is self._ctx.memory
        self.seq_rm.append((seq_id, p0, p1))
        return True

    def llama_memory_seq_cp(self, memory: object, src: int, dst: int, p0: int, p1: int) -> None:
        assert memory is self._ctx.memory
        self.seq_cp.append((src, dst, p0, p1))

    def llama_decode(self, ctx: object, batch: FakeBatch) -> int:
        assert ctx is self._ctx.ctx
        assert 0 < batch.n_tokens <= batch.size
        rows = range(batch.n_tokens)
        assert all(batch.n_seq_id[i] == 1 for i in rows)
        self.decodes.append([(batch.seq_id[i][0], batch.pos[i], batch.token[i]) for i in rows])
        self.logits_rows.append([i for i in rows if batch.logits[i]])
        code, self.fail_next_decode = self.fail_next_decode, 0
        return code


class ScriptedSampler:
    """Returns its script's tokens in order; records the batch rows it was asked to sample."""

    def __init__(self, script: list[int], *, logprob: float | None = None) -> None:
        self.script = list(script)
        self.logprob = logprob
        self.last_logprob: TokenLogprob | None = None
        self.indices: list[int] = []
        self.closed = 0

    def sample(self, ctx: Any, index: int) -> int:
        assert self.script, "sampled more tokens than scripted"
        self.indices.append(index)
        token = self.script.pop(0)
        if self.logprob is not None:
            self.last_logprob = TokenLogprob(PIECES[token], self.logprob)
        return token

    def close(self) -> None:
        self.closed += 1


class Rig:
    """A scheduler on the fakes, with one scripted sampler and one output list per request."""

    def __init__(
        self,
        *,
        n_slots: int,
        kv_tokens: int,
        batch_size: int,
        unified: bool = True,
        **options: Any,
    ) -> None:
        self.ctx = FakeCtx()
        self.lib = FakeLib(self.ctx)
        self.scripts: dict[str, list[int]] = {}
        self.logprobs: dict[str, float] = {}
        self.refuse: set[str] = set()
        self.samplers: dict[str, ScriptedSampler] = {}
        self.outputs: dict[str, list[Output]] = {}
        self.scheduler = BatchScheduler(
            self.lib,
            self.ctx,
            make_sampler=self._make_sampler,
            pieces=PIECES,
            is_eog=IS_EOG,
            n_slots=n_slots,
            kv_tokens=kv_tokens,
            batch_size=batch_size,
            unified=unified,
            clock=lambda: self.now,
            **options,
        )
        self.now = 0.0

    def _make_sampler(self, request: GenerationRequest) -> ScriptedSampler:
        rid = request.request_id
        if rid in self.refuse:
            raise EngineRequestError(f"{rid} refused", param="response_format")
        sampler = ScriptedSampler(self.scripts[rid], logprob=self.logprobs.get(rid))
        self.samplers[rid] = sampler
        return sampler

    def submit(
        self,
        rid: str,
        prompt: tuple[int, ...],
        max_tokens: int,
        *,
        script: list[int] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> Job:
        request = GenerationRequest(
            rid, prompt, max_tokens, sampling=SamplingParams(ignore_eos=ignore_eos, seed=seed)
        )
        self.scripts[rid] = script if script is not None else [FILLER] * max_tokens
        outputs: list[Output] = []
        self.outputs[rid] = outputs
        job = Job(request, outputs.append)
        self.scheduler.waiting.append(job)
        return job

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.scheduler.step()

    def run_until_idle(self, max_steps: int = 100) -> None:
        for _ in range(max_steps):
            scheduler = self.scheduler
            if not scheduler.running and not scheduler.waiting and not scheduler.preempted:
                return
            self.scheduler.step()
        raise AssertionError("the scheduler never went idle")

    def chunks(self, rid: str) -> list[TokenChunk]:
        outputs = self.outputs[rid]
        assert all(isinstance(o, TokenChunk) for o in outputs), outputs
        return [o for o in outputs if isinstance(o, TokenChunk)]

    def finish_reasons(self, rid: str) -> list[str | None]:
        return [c.finish_reason for c in self.chunks(rid)]

    def cached(self, slot: int) -> list[int]:
        return self.scheduler.slots[slot].cached

    def counts(self) -> tuple[int, int]:
        """(running, waiting)"""
        return self.scheduler.running, len(self.scheduler.waiting)


def span(start: int, n: int) -> tuple[int, ...]:
    """n consecutive token ids from `start`: a prompt that shares nothing with other spans."""
    return tuple(range(start, start + n))


def prefill_rows(seq_id: int, prompt: tuple[int, ...], start: int, stop: int) -> list[Row]:
    return [(seq_id, pos, prompt[pos]) for pos in range(start, stop)]


# --- admission against the KV pool -------------------------------------------------------------


def test_request_that_does_not_fit_free_kv_waits_until_the_running_one_finishes() -> None:
    rig = Rig(n_slots=2, kv_tokens=21, batch_size=8)
    a_prompt, b_prompt = span(10, 4), span(40, 6)
    rig.submit("a", a_prompt, 6, script=[21, 22, 23, 24, 25, 26])  # reserves 4 + 6 = 10
    rig.submit("b", b_prompt, 6)  # needs 6 + 6 = 12: 10 + 12 > 21

    rig.step()
    assert rig.counts() == (1, 1)
    assert rig.scheduler.kv_reserved == 10
    assert rig.lib.decodes == [prefill_rows(0, a_prompt, 0, 4)]

    rig.step(4)  # a decodes its 2nd..5th tokens; b still waits
    assert rig.counts() == (1, 1)
    rig.step()  # a's 6th token: "length", and a leaves
    assert rig.counts() == (0, 1)
    assert rig.finish_reasons("a") == [None] * 5 + ["length"]
    assert rig.outputs["b"] == []
    assert rig.lib.decodes[1:] == [[(0, 4 + i, 21 + i)] for i in range(5)]

    rig.step()  # the step after a finished: b is admitted and prefilled
    assert rig.counts() == (1, 0)
    assert rig.scheduler.kv_reserved == 12
    assert rig.lib.decodes[6] == prefill_rows(1, b_prompt, 0, 6)
    # a's KV (prompt + the 5 tokens fed back) stays cached: 9 + 12 fits in 21, nothing evicted.
    assert rig.cached(0) == [10, 11, 12, 13, 21, 22, 23, 24, 25]
    assert rig.lib.seq_rm == [(0, 0, -1), (1, 0, -1)]


def test_waiting_requests_are_admitted_in_order_so_a_small_one_waits_behind_a_big_one() -> None:
    rig = Rig(n_slots=3, kv_tokens=20, batch_size=8)
    rig.submit("a", span(10, 4), 6)  # reserves 10
    rig.submit("big", span(30, 6), 6)  # needs 12: 10 + 12 > 20
    rig.submit("small", span(50, 2), 1)  # needs 3: would fit, but waits its turn

    rig.step()
    assert rig.counts() == (1, 2)
    assert [job.request.request_id for job in rig.scheduler.waiting] == ["big", "small"]
    assert rig.outputs["small"] == []


# --- eviction of idle cached slots -------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_tokens", "evicted"),
    [
        (1, []),  # need 6: 6 cached elsewhere + 6 fits in 12
        (3, [2]),  # need 8: evicting the least recently used (slot 2, 3 cells) is enough
        (5, [2, 0]),  # need 10: slot 2, then slot 0
    ],
)
def test_idle_cached_slots_are_evicted_least_recently_used_first_and_only_as_needed(
    max_tokens: int, evicted: list[int]
) -> None:
    rig = Rig(n_slots=3, kv_tokens=12, batch_size=4)
    # One request at a time, each 3 prompt tokens and 1 generated (nothing fed back): every slot
    # ends up holding its prompt's 3 cells. Use order: slot 0, slot 1, slot 2, then slot 0 again
    # (its prompt shares a prefix, 2 tokens reused), so least recently used is slot 1, 2, 0.
    for rid, prompt in [
        ("a", (10, 11, 12)),
        ("b", (20, 21, 22)),
        ("c", (30, 31, 32)),
        ("d", (10, 11, 15)),
    ]:
        rig.submit(rid, prompt, 1)
        rig.run_until_idle()
    assert [rig.cached(i) for i in range(3)] == [[10, 11, 15], [20, 21, 22], [30, 31, 32]]
    assert rig.lib.seq_rm == [(0, 0, -1), (1, 0, -1), (2, 0, -1), (0, 2, -1)]
    del rig.lib.seq_rm[:]

    # Shares no prefix with any slot: takes the least recently used one (slot 1), whose own
    # cells it overwrites, so only slots 0 and 2 may have to make room.
    rig.submit("e", span(50, 5), max_tokens)
    rig.step()

    assert rig.counts() == (1, 0)
    assert rig.lib.seq_rm == [(seq, -1, -1) for seq in evicted] + [(1, 0, -1)]
    for seq, cells in [(0, [10, 11, 15]), (2, [30, 31, 32])]:
        assert rig.cached(seq) == ([] if seq in evicted else cells)
    assert rig.scheduler.kv_reserved == 5 + max_tokens


def test_no_cache_is_evicted_for_a_request_that_would_not_fit_anyway() -> None:
    rig = Rig(n_slots=3, kv_tokens=20, batch_size=4)
    rig.submit("a", span(10, 4), 1)  # leaves 4 cells cached in slot 0
    rig.run_until_idle()
    rig.submit("b", span(30, 4), 12)  # runs in slot 1, reserving 16
    rig.step()
    del rig.lib.seq_rm[:]

    rig.submit("c", span(50, 3), 2)  # needs 5: 16 reserved + 5 > 20 even without a's cache
    rig.step()

    assert rig.counts() == (1, 1)
    assert rig.lib.seq_rm == []
    assert rig.cached(0) == list(span(10, 4))


def test_running_sequences_are_never_evicted_to_make_room() -> None:
    rig = Rig(n_slots=2, kv_tokens=20, batch_size=8)
    rig.submit("a", span(10, 4), 12)  # reserves 16 of 20
    rig.step()
    rig.submit("b", span(40, 4), 4)  # needs 8: only a's reservation could make room

    rig.step(3)
    assert rig.counts() == (1, 1)
    assert rig.lib.seq_rm == [(0, 0, -1)]
    assert [len(rows) for rows in rig.lib.decodes] == [4, 1, 1, 1]  # a alone


def test_a_long_max_tokens_promises_only_room_to_grow_so_others_run_beside_it() -> None:
    # An unset max_tokens is all the context: promised whole, it would keep everyone waiting.
    rig = Rig(n_slots=2, kv_tokens=30, batch_size=8, growth_reserve=4)
    rig.submit("long", span(10, 4), 24)  # promised 4 + 4, not 4 + 24
    rig.submit("short", span(40, 4), 4)  # 8 more: fits beside it
    rig.step()
    assert rig.counts() == (2, 0)
    assert rig.scheduler.kv_reserved == 16


def test_when_the_pool_runs_out_the_newest_sequence_is_preempted_then_resumed_whole() -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=8, growth_reserve=2)
    rig.submit("old", span(10, 3), 4, script=[21, 22, 23, 24])
    rig.step()  # old: prefilled, samples 21
    rig.submit("new", span(40, 3), 3, script=[31, 32, 33])
    rig.step()  # old decodes 21 -> 22; new prefilled -> 31
    assert rig.counts() == (2, 0)
    del rig.lib.seq_rm[:]

    rig.lib.fail_next_decode = 1  # llama.cpp: no room for this batch
    rig.step()
    assert rig.lib.seq_rm == [(1, -1, -1)]  # new, the most recently started, gives way
    assert rig.scheduler.slots[1].pending == [40, 41, 42, 31]  # its prompt and its token
    assert (rig.scheduler.running, rig.scheduler.preempted, rig.scheduler.preemptions) == (
        1, 1, 1,
    )  # fmt: skip
    decodes_before = len(rig.lib.decodes)

    rig.run_until_idle()
    # old ran on alone; once it ended, new read its tokens again and went on where it was.
    assert rig.lib.decodes[decodes_before] == [(0, 4, 22)]
    resumed = next(d for d in rig.lib.decodes[decodes_before:] if d[0][0] == 1)
    assert resumed == [(1, pos, tok) for pos, tok in enumerate([40, 41, 42, 31])]
    assert [c.token_ids for c in rig.chunks("new")] == [(31,), (32,), (33,)]
    assert rig.finish_reasons("new") == [None, None, "length"]
    assert rig.finish_reasons("old") == [None, None, None, "length"]


def test_a_preempted_request_that_is_cancelled_leaves_nothing_behind() -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=8)
    rig.submit("old", span(10, 3), 6)
    rig.step()
    new = rig.submit("new", span(40, 3), 6)
    rig.step()
    rig.lib.fail_next_decode = 1
    rig.step()
    assert rig.scheduler.preempted == 1

    new.cancelled.set()
    rig.step()
    slot = rig.scheduler.slots[1]
    assert (slot.busy, slot.preempted, slot.cached, slot.pending) == (False, False, [], [])
    assert rig.scheduler.preempted == 0
    rig.submit("next", span(60, 2), 1)
    rig.run_until_idle()  # nothing waits on the cancelled one
    assert rig.finish_reasons("next") == ["length"]


def test_idle_caches_are_dropped_before_anyone_is_preempted() -> None:
    rig = Rig(n_slots=3, kv_tokens=100, batch_size=8)
    rig.submit("done", span(60, 5), 1)
    rig.run_until_idle()  # slot 0 keeps 5 cells
    rig.submit("a", span(10, 3), 5)
    rig.submit("b", span(20, 3), 5)
    rig.step()
    del rig.lib.seq_rm[:]

    rig.lib.fail_next_decode = 1
    rig.step()
    assert rig.lib.seq_rm == [(0, -1, -1)]
    assert (rig.scheduler.running, rig.scheduler.preempted) == (2, 0)


def test_the_only_running_sequence_is_never_preempted_it_fails() -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=8)
    rig.submit("a", span(10, 3), 5)
    rig.step()
    rig.lib.fail_next_decode = 1
    rig.step()
    assert isinstance(rig.outputs["a"][-1], RuntimeError)
    assert rig.counts() == (0, 0)


def test_idle_caches_stay_while_nothing_runs_and_go_once_stale_or_too_many() -> None:
    rig = Rig(n_slots=4, kv_tokens=100, batch_size=8, idle_cache_tokens=8, idle_cache_seconds=30)
    for rid, start in [("x", 10), ("y", 20), ("z", 30)]:
        rig.submit(rid, span(start, 4), 1)
        rig.run_until_idle()
        rig.now += 10
    assert [len(rig.cached(i)) for i in range(3)] == [4, 4, 4]  # 12 > 8, but nothing runs

    rig.submit("run", span(50, 2), 5)
    rig.step()
    # Over 8 idle cells: the least recently used (x) goes; y and z are younger than 30 s.
    assert [len(rig.cached(i)) for i in range(3)] == [0, 4, 4]
    rig.now += 15  # y ended 35 s ago, z 25 s ago
    rig.step()
    assert [len(rig.cached(i)) for i in range(3)] == [0, 0, 4]


def test_while_requests_run_only_the_four_most_recent_idle_caches_stay() -> None:
    rig = Rig(n_slots=8, kv_tokens=200, batch_size=8)
    for i in range(5):
        rig.submit(f"done{i}", span(10 * (i + 1), 3), 1)
        rig.run_until_idle()
    assert [bool(rig.cached(i)) for i in range(6)] == [True] * 5 + [False]

    rig.submit("run", span(100, 2), 5)  # in slot 5; five idle caches beside it
    rig.step()
    assert [bool(rig.cached(i)) for i in range(5)] == [False, True, True, True, True]


def test_prefill_counts_as_progress_before_any_token_comes_out() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=4)
    rig.submit("long", span(10, 10), 1)
    rig.step()
    assert (rig.scheduler.evaluated_tokens, rig.outputs["long"]) == (4, [])
    rig.step()
    assert rig.scheduler.evaluated_tokens == 8


def test_a_long_prompt_left_out_by_shorter_ones_goes_first_after_a_few_steps() -> None:
    rig = Rig(n_slots=4, kv_tokens=400, batch_size=4)
    rig.submit("long", span(100, 40), 1)
    rig.step()  # alone: it takes the first 4 tokens
    for i in range(6):  # then a 4-token question every step, each filling a step alone
        rig.submit(f"q{i}", span(10 + 5 * i, 4), 1)
        rig.step()
    long_rows = [len([row for row in rows if row[0] == 0]) for rows in rig.lib.decodes]
    # Left out STARVED_STEPS (4) steps running, it goes first on the next one.
    assert long_rows == [4, 0, 0, 0, 0, 4, 0]
    assert [len(rig.outputs[f"q{i}"]) for i in range(6)] == [1, 1, 1, 1, 1, 0]  # q4 waited once


# --- prefix reuse ------------------------------------------------------------------------------


def test_new_request_takes_the_free_slot_sharing_the_longest_prefix_with_its_prompt() -> None:
    rig = Rig(n_slots=3, kv_tokens=100, batch_size=4)
    short, long = (10, 11, 12, 99), span(10, 10)
    rig.submit("short", short, 1)  # slot 0
    rig.submit("long", long, 1)  # slot 1
    rig.run_until_idle()
    assert (rig.cached(0), rig.cached(1), rig.cached(2)) == (list(short), list(long), [])
    del rig.lib.seq_rm[:]
    first_new_decode = len(rig.lib.decodes)

    # Shares 3 tokens with slot 0 and 9 with slot 1; slot 2 is the least recently used.
    prompt = (*span(10, 9), 77, 78, 79)
    rig.submit("c", prompt, 1)
    rig.step()

    # All 9 shared tokens are reused; the rest is evaluated from pos 9.
    assert rig.lib.seq_rm == [(1, 9, -1)]
    assert rig.lib.seq_cp == []
    assert rig.scheduler.prefix_tokens_reused == 9
    assert rig.lib.decodes[first_new_decode:] == [prefill_rows(1, prompt, 9, 12)]
    assert (rig.cached(0), rig.cached(1), rig.cached(2)) == (list(short), list(prompt), [])
    assert rig.chunks("c") == [TokenChunk((FILLER,), PIECES[FILLER], "length")]


@pytest.mark.parametrize(
    ("prompt", "seed", "reuse"),
    [
        # Unseeded: every shared token, but at least one token is evaluated.
        (span(10, 8), None, 7),  # all 8 cached: 7
        ((*span(10, 8), 30, 40), None, 9),  # 9 shared (a generated token too)
        ((*span(10, 7), 98, 99), None, 7),
        ((10, 11, 12, 50, 51), None, 3),
        # Seeded: cut to whole chunks of 4, so its prompt is evaluated as a fresh one would be.
        (span(10, 8), 7, 4),
        ((*span(10, 8), 30, 40), 7, 8),
        ((*span(10, 7), 98, 99), 7, 4),
        ((10, 11, 12, 50, 51), 7, 0),  # 3 shared: less than a chunk, nothing reused
    ],
)
def test_reuse_covers_every_shared_token_but_whole_chunks_for_a_seeded_request(
    prompt: tuple[int, ...], seed: int | None, reuse: int
) -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=4)
    rig.submit("first", span(10, 8), 2, script=[30, 31])
    rig.run_until_idle()
    assert rig.cached(0) == [*span(10, 8), 30]  # the last sampled token is never fed back
    first_new_decode = len(rig.lib.decodes)

    rig.submit("again", prompt, 1, seed=seed)
    rig.step()

    assert rig.lib.seq_rm[-1] == (0, reuse, -1)
    assert rig.scheduler.prefix_tokens_reused == reuse
    # A seeded prompt's first chunk runs to the next multiple of the batch size: the same cut
    # either way. An unseeded one fills the batch.
    stop = min(len(prompt), reuse + 4 - (reuse % 4 if seed is not None else 0))
    assert rig.lib.decodes[first_new_decode] == prefill_rows(0, prompt, reuse, stop)


def test_a_prefix_cached_in_another_slot_is_copied_even_while_that_slot_is_running() -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=8)
    system = span(10, 6)
    rig.submit("a", (*system, 50), 10)  # slot 0, still running below
    rig.step()
    first_new_decode = len(rig.lib.decodes)

    prompt = (*system, 60, 61)
    rig.submit("b", prompt, 1)
    rig.step()

    # b gets slot 1, empty; slot 0 holds the 6-token system prompt (and more): copied over.
    assert rig.lib.seq_rm[-1] == (1, -1, -1)
    assert rig.lib.seq_cp == [(0, 1, 0, 6)]
    assert rig.scheduler.prefix_tokens_reused == 6
    assert rig.cached(1) == list(prompt)
    assert (1, 6, 60) in rig.lib.decodes[first_new_decode]
    assert all(row[0] != 1 or row[1] >= 6 for row in rig.lib.decodes[first_new_decode])
    assert rig.chunks("b") == [TokenChunk((FILLER,), PIECES[FILLER], "length")]
    assert rig.counts() == (1, 0)  # a runs on


def test_split_slots_copy_another_slots_whole_buffer_then_trim_it_to_the_shared_prefix() -> None:
    rig = Rig(n_slots=2, kv_tokens=20, batch_size=8, unified=False)  # 20 cells per slot
    system = span(10, 6)
    rig.submit("a", (*system, 50), 10)
    rig.step()

    rig.submit("b", (*system, 60, 61), 1)
    rig.step()

    # llama.cpp copies across slots' buffers only whole: copy all, then drop past the prefix.
    assert rig.lib.seq_cp == [(0, 1, -1, -1)]
    assert rig.lib.seq_rm[-2:] == [(1, -1, -1), (1, 6, -1)]
    assert rig.cached(1) == [*system, 60, 61]
    assert rig.scheduler.prefix_tokens_reused == 6


def test_split_slots_admit_by_their_own_share_and_refuse_what_can_never_fit() -> None:
    rig = Rig(n_slots=2, kv_tokens=10, batch_size=8, unified=False)  # 10 cells per slot
    rig.submit("a", span(10, 4), 6)  # 10: fills slot 0 exactly
    rig.submit("b", span(30, 4), 6)  # 10: slot 1; a unified pool of 10 could not take both
    rig.submit("c", span(50, 4), 7)  # 11: more than any slot holds
    rig.step()

    assert rig.counts() == (2, 0)
    (error,) = rig.outputs["c"]
    assert isinstance(error, EngineRequestError)
    assert error.param == "max_tokens"
    assert "11 tokens" in str(error)
    rig.run_until_idle()
    assert [len(rig.chunks(rid)) for rid in ("a", "b")] == [6, 6]


def test_what_a_step_emits_is_flushed_once_at_its_end() -> None:
    rig = Rig(n_slots=3, kv_tokens=100, batch_size=8)
    flushes: list[int] = []
    rig.scheduler._flush = lambda: flushes.append(sum(map(len, rig.outputs.values())))
    for rid, start in [("a", 10), ("b", 20), ("c", 30)]:
        rig.submit(rid, span(start, 2), 2)

    rig.step(2)

    assert flushes == [3, 6]  # one token per sequence per step, handed over together


# --- one decode call: decoding tokens first, then prompt chunks ---------------------------------


@pytest.mark.parametrize(
    ("seed", "chunks"),
    [
        # Unseeded: b's prompt takes all 3 rows a's token leaves, every step.
        (None, [(0, 3), (3, 6), (6, 9), (9, 10)]),
        # Seeded: a chunk also stops at each multiple of 4 (after pos 3 and pos 7), so the
        # prompt is cut as it would be with nothing cached.
        (7, [(0, 3), (3, 4), (4, 7), (7, 8), (8, 10)]),
    ],
)
def test_prompt_chunks_fill_the_batch_beside_decoding_tokens(
    seed: int | None, chunks: list[tuple[int, int]]
) -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=4)
    rig.submit("a", (10, 11), 20, script=list(range(21, 41)))
    rig.step()
    assert rig.lib.decodes == [[(0, 0, 10), (0, 1, 11)]]

    b_prompt = span(40, 10)
    rig.submit("b", b_prompt, 1, script=[60], seed=seed)
    rig.step(len(chunks) + 1)

    # a's next token always comes first; b's prompt takes the rows left.
    assert rig.lib.decodes[1:] == [
        *(
            [(0, 2 + i, 21 + i), *prefill_rows(1, b_prompt, *chunk)]
            for i, chunk in enumerate(chunks)
        ),
        [(0, 2 + len(chunks), 21 + len(chunks))],  # b finished at its first token
    ]
    # Logits only for a's token each step, and for the last prompt token of b.
    last = chunks[-1][1] - chunks[-1][0]  # after a's row
    assert rig.lib.logits_rows[1:] == [[0]] * (len(chunks) - 1) + [[0, last], [0]]
    assert rig.samplers["b"].indices == [last]
    assert rig.chunks("b") == [TokenChunk((60,), b"<60>", "length")]


def test_the_shortest_prompt_is_read_first_so_a_long_one_never_holds_up_a_question() -> None:
    rig = Rig(n_slots=3, kv_tokens=100, batch_size=4)
    rig.submit("long", span(10, 12), 1)
    rig.step()  # long's first 4 tokens
    rig.submit("question", span(40, 2), 1, script=[60])
    rig.step()
    # The question's 2 tokens go first (and it is answered now); long takes the rest.
    assert rig.lib.decodes[-1] == [*prefill_rows(1, span(40, 2), 0, 2), (0, 4, 14), (0, 5, 15)]
    assert rig.chunks("question") == [TokenChunk((60,), b"<60>", "length")]


def test_a_prompt_longer_than_the_batch_is_prefilled_over_several_steps_before_sampling() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=4)
    prompt = span(10, 10)
    rig.submit("a", prompt, 1, script=[60])

    rig.step(2)
    assert rig.outputs["a"] == []
    rig.step()

    assert rig.lib.decodes == [
        prefill_rows(0, prompt, 0, 4),
        prefill_rows(0, prompt, 4, 8),
        prefill_rows(0, prompt, 8, 10),
    ]
    assert rig.lib.logits_rows == [[], [], [1]]
    assert rig.samplers["a"].indices == [1]
    assert rig.chunks("a") == [TokenChunk((60,), b"<60>", "length")]


# --- refusals, cancellation, failures -----------------------------------------------------------


def test_request_the_sampler_refuses_gets_that_error_alone_and_the_next_one_runs() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    rig.refuse.add("bad")
    rig.submit("bad", span(10, 3), 4)
    rig.submit("good", span(40, 3), 1, script=[60])

    rig.step()

    [error] = rig.outputs["bad"]
    assert isinstance(error, EngineRequestError)
    assert str(error) == "bad refused"
    assert error.param == "response_format"
    assert rig.chunks("good") == [TokenChunk((60,), b"<60>", "length")]
    assert rig.lib.seq_rm == [(0, 0, -1)]  # only good ever took the slot
    assert rig.lib.decodes == [prefill_rows(0, span(40, 3), 0, 3)]
    assert rig.counts() == (0, 0)


def test_cancelled_requests_are_dropped_whether_waiting_or_running() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    a = rig.submit("a", (10, 11, 12), 10, script=[21, 22, 23])
    b = rig.submit("b", span(40, 3), 10)
    rig.step()
    assert rig.counts() == (1, 1)

    b.cancelled.set()  # waiting
    rig.step()
    assert rig.counts() == (1, 0)
    assert rig.outputs["b"] == []
    assert "b" not in rig.samplers  # never admitted

    a.cancelled.set()  # running
    rig.step()
    assert rig.counts() == (0, 0)
    assert rig.scheduler.slots[0].job is None
    assert rig.samplers["a"].closed == 1
    assert rig.finish_reasons("a") == [None, None]  # nothing more after the cancel
    assert len(rig.lib.decodes) == 2  # no decode once nothing runs
    assert rig.cached(0) == [10, 11, 12, 21]  # its KV stays for reuse
    assert rig.scheduler.kv_reserved == 0

    rig.submit("c", span(60, 2), 1)
    rig.step()
    assert rig.chunks("c") == [TokenChunk((FILLER,), PIECES[FILLER], "length")]
    assert rig.lib.decodes[-1] == prefill_rows(0, span(60, 2), 0, 2)


def test_a_failed_decode_fails_the_running_requests_clears_the_cache_and_serving_goes_on() -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=8)
    rig.submit("a", span(10, 2), 5)
    rig.submit("b", span(20, 2), 5)
    rig.submit("c", span(30, 2), 1, script=[60])
    rig.step()
    assert rig.counts() == (2, 1)
    del rig.lib.seq_rm[:]

    rig.lib.fail_next_decode = -3
    rig.step()

    for rid in ("a", "b"):
        *chunks, error = rig.outputs[rid]
        assert chunks == [TokenChunk((FILLER,), PIECES[FILLER])]
        assert isinstance(error, RuntimeError)
        assert str(error) == "llama_decode returned -3"
        assert rig.samplers[rid].closed == 1
    assert rig.lib.seq_rm == [(0, -1, -1), (1, -1, -1)]
    assert (rig.cached(0), rig.cached(1)) == ([], [])
    assert rig.counts() == (0, 1)

    rig.step()  # c, which waited, runs on the freed slots
    assert rig.chunks("c") == [TokenChunk((60,), b"<60>", "length")]
    assert rig.lib.decodes[-1] == prefill_rows(0, span(30, 2), 0, 2)


def _crash(request: GenerationRequest) -> ScriptedSampler:
    raise RuntimeError(f"cannot build a sampler for {request.request_id}")


def test_a_sampler_that_crashes_fails_its_request_instead_of_losing_it() -> None:
    """It once left such a request off the queue and unanswered: its client waited forever."""
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    rig.submit("boom", span(10, 3), 4)
    rig.scheduler._make_sampler = _crash

    rig.step()

    assert "boom" not in [job.request.request_id for job in rig.scheduler.waiting]
    (error,) = rig.outputs["boom"]
    assert isinstance(error, RuntimeError)
    assert str(error) == "cannot build a sampler for boom"
    assert rig.counts() == (0, 0)


# --- endings -----------------------------------------------------------------------------------


def test_generation_stops_with_length_at_max_tokens() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    rig.submit("a", (10, 11), 3, script=[21, 22, 23])
    rig.run_until_idle()

    assert rig.chunks("a") == [
        TokenChunk((21,), b"<21>"),
        TokenChunk((22,), b"<22>"),
        TokenChunk((23,), b"<23>", "length"),
    ]
    assert rig.lib.decodes == [[(0, 0, 10), (0, 1, 11)], [(0, 2, 21)], [(0, 3, 22)]]
    assert rig.samplers["a"].closed == 1
    assert rig.cached(0) == [10, 11, 21, 22]


@pytest.mark.parametrize("max_tokens", [5, 2])  # an end token at the last place stops too
def test_end_of_generation_token_stops_with_stop_and_an_empty_piece(max_tokens: int) -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    rig.submit("a", (10, 11), max_tokens, script=[21, EOS])
    rig.run_until_idle()

    assert rig.chunks("a") == [TokenChunk((21,), b"<21>"), TokenChunk((EOS,), b"", "stop")]
    assert len(rig.lib.decodes) == 2
    assert rig.samplers["a"].closed == 1


def test_ignore_eos_emits_the_end_token_as_text_and_keeps_generating() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    rig.submit("a", (10, 11), 3, script=[21, EOS, 22], ignore_eos=True)
    rig.run_until_idle()

    assert rig.chunks("a") == [
        TokenChunk((21,), b"<21>"),
        TokenChunk((EOS,), b"</s>"),
        TokenChunk((22,), b"<22>", "length"),
    ]
    assert rig.lib.decodes[-1] == [(0, 3, EOS)]  # the end token is fed back like any other


def test_the_sampled_token_logprob_rides_along_in_its_chunk() -> None:
    rig = Rig(n_slots=1, kv_tokens=100, batch_size=8)
    rig.logprobs["a"] = -0.25
    rig.submit("a", (10, 11), 2, script=[21, 22])
    rig.run_until_idle()

    assert rig.chunks("a") == [
        TokenChunk((21,), b"<21>", None, (TokenLogprob(b"<21>", -0.25),)),
        TokenChunk((22,), b"<22>", "length", (TokenLogprob(b"<22>", -0.25),)),
    ]


def test_close_closes_running_samplers_and_frees_the_batch() -> None:
    rig = Rig(n_slots=2, kv_tokens=100, batch_size=8)
    rig.submit("a", span(10, 2), 5)
    rig.step()

    rig.scheduler.close()

    assert rig.lib.batch_inits == [(8, 0, 1)]
    assert len(rig.lib.freed) == 1
    assert rig.samplers["a"].closed == 1
