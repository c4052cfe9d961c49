"""Continuous batching over one llama.cpp context, the way llama.cpp's own server uses slots.

Every step packs one `llama_decode` call with the next token of each running sequence, then fills
the rest of the batch with prompt chunks of sequences still prefilling, so a long prompt never
stalls the others' decoding. A request joins at the next step and leaves when done. All the rows
of a step are sampled together (step_sampling), and what the step produced for every sequence
leaves in one hand-over (`flush`), so the per-token work stays off the per-sequence path.

The KV cache is one pool shared by all slots (`unified`, the default, as llama.cpp's server
now does), so one request may use the whole context beside many others. A request is admitted
when its prompt plus a little room to grow fits in what is free (idle slots' caches are
evicted, least recently used first); the rest of its max_tokens is not held back, as vLLM
does not: when the pool runs out mid-generation, the most recently started sequence is
preempted (its cells freed) and resumed later by evaluating its tokens again, the oldest first,
before any new request. Every token's attention walks all the pool's occupied cells (llama.cpp
skips the masked ones cheaply, not for free), so the cells idle caches hold are bounded
(`idle_cache_tokens`, least recently used evicted first). Split (`unified=False`), each slot
has an equal share of its own, as llama.cpp's server does with --parallel without
--kv-unified: a token then attends only over its own slot's cells, and a request may hold
only that share.

A finished sequence's KV stays in its slot, and a new request reuses every cached token of the
longest prefix it shares with any slot (a system prompt, the earlier turns of a chat): from its
own slot, or copied from another one, running or not (in a unified pool a copy only tags the
cells; split, the other slot's cells are copied). A seeded request reuses whole prefill chunks
only: llama.cpp's logits are not bit-identical across batch shapes, so the rest of its prompt
is evaluated in exactly the chunks a fresh request would use, and it gives the same text
whether or not its prefix was cached.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from vllm_obtain.contract import EngineRequestError, GenerationRequest, TokenChunk
from vllm_obtain.engines.engine_thread import Job
from vllm_obtain.engines.llama_cpp.step_sampling import Pick, Sampler, StepSampler, sample_each

# KV cells a new request is promised beyond its prompt (its max_tokens, when smaller): enough
# that short answers never preempt anybody, small enough that an unset max_tokens (all the
# context) does not keep others waiting for room it may never use.
GROWTH_RESERVE = 256
# How long an idle cache may slow running requests before it is dropped: an agent's next turn
# (after a tool ran) or a chat's next message usually comes sooner; re-reading a long prompt
# costs far more than walking its cells for that long.
IDLE_CACHE_SECONDS = 30.0
IDLE_CACHES = 4
STARVED_STEPS = 4


def shared_prefix(a: list[int], b: tuple[int, ...] | list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Slot:
    """One sequence id in the context: the tokens its KV holds, and the request using it."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not evaluated yet
    next_token: int | None = None  # sampled, to be evaluated in the next step
    sampler: Sampler | None = None
    reserved: int = 0  # KV cells promised at admission: prompt + the room to grow given
    produced: int = 0
    last_used: int = 0  # a clock tick: when its request started (busy) or ended (idle)
    idle_since: float = 0.0  # when its last request ended (the scheduler's clock)
    preempted: bool = False  # its cells were freed for others; `pending` holds all its tokens
    starved: int = 0  # steps its pending prompt got no room in the batch

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def decoding(self) -> bool:
        return self.job is not None and not self.preempted

    @property
    def seeded(self) -> bool:
        return self.job is not None and self.job.request.sampling.seed is not None

    @property
    def held(self) -> int:
        """KV cells this slot holds or was promised (a copied prefix counted in every slot
        that shares it: the count errs on the full side)."""
        if self.job is None:
            return len(self.cached)
        if self.preempted:
            return 0
        return max(self.reserved, len(self.cached) + len(self.pending) + 1)


class BatchScheduler:
    """Runs on the engine thread; owns the context, the batch and the slots.

    `lib` is llama_cpp's C API (batches, KV memory, decode); `make_sampler` gives a request its
    sampler, or raises (EngineRequestError: refused) to fail that request alone; `sample_step`
    samples all of a step's rows; `flush` hands over what the step emitted.
    """

    def __init__(
        self,
        lib: Any,
        ctx: Any,
        *,
        make_sampler: Callable[[GenerationRequest], Sampler],
        pieces: list[bytes],
        is_eog: list[bool],
        n_slots: int,
        kv_tokens: int,
        batch_size: int,
        unified: bool = True,
        growth_reserve: int = GROWTH_RESERVE,
        idle_cache_tokens: int | None = None,
        idle_cache_seconds: float = IDLE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sample_step: StepSampler = sample_each,
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self._lib, self._ctx, self._make_sampler = lib, ctx, make_sampler
        self._sample_step, self._flush = sample_step, flush
        self._pieces, self._is_eog = pieces, is_eog
        # Unified: the whole pool; split: each slot's own share.
        self._kv_tokens, self._batch_size, self._unified = kv_tokens, batch_size, unified
        self._growth_reserve = growth_reserve
        self._idle_cache_tokens = kv_tokens if idle_cache_tokens is None else idle_cache_tokens
        self._idle_cache_seconds, self._now = idle_cache_seconds, clock
        self._batch = lib.llama_batch_init(batch_size, 0, 1)
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.waiting: deque[Job] = deque()
        self.prefix_tokens_reused = 0  # prompt tokens served from cache instead of recomputed
        self.evaluated_tokens = 0  # tokens through llama_decode: progress, prefill included
        self.preemptions = 0
        self._ended_since_preemption = True
        self._clock = itertools.count()

    @property
    def running(self) -> int:
        return sum(slot.decoding for slot in self.slots)

    @property
    def preempted(self) -> int:
        return sum(slot.busy and slot.preempted for slot in self.slots)

    @property
    def kv_reserved(self) -> int:
        """KV cells running requests hold or were promised (what admission counts)."""
        return sum(s.held for s in self.slots if s.busy)

    def close(self) -> None:
        for slot in self.slots:
            self._release(slot)
        self._lib.llama_batch_free(self._batch)

    def serve(self, jobs: queue.Queue[Job | None]) -> None:
        """The engine loop: take new jobs, admit what fits, run one step; until told to stop."""
        while True:
            idle = not self.running and not self.waiting and not self.preempted
            try:
                incoming = jobs.get(block=idle)
                while True:
                    if incoming is None:
                        return
                    self.waiting.append(incoming)
                    incoming = jobs.get_nowait()
            except queue.Empty:
                pass
            self.step()

    def step(self) -> None:
        """Drop cancelled requests, admit the waiting ones that fit, decode one step."""
        self._drop_cancelled()
        try:
            self._admit()
            if self._unified:
                self._trim_idle_caches()
            if self.running:
                self._decode()
        except Exception as exc:  # a bug or a native error: fail these requests, keep serving
            logger.exception("llama.cpp step failed")
            self._fail_all(exc)
        finally:
            self._flush()

    # --- admission ------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        self.waiting = deque(job for job in self.waiting if not job.cancelled.is_set())
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._finish(slot)

    def _kv_in_use(self, excluding: Slot | None = None) -> int:
        return sum(s.held for s in self.slots if s is not excluding)

    def _admit(self) -> None:
        while self._resume_preempted():
            pass
        if self.preempted:
            return  # who was preempted goes first: nothing new until it runs again
        while self.waiting:
            job = self.waiting[0]
            prompt = job.request.prompt_tokens
            need = len(prompt) + job.request.max_tokens
            if need > self._kv_tokens:  # would wait forever; the server's limits keep this out
                self.waiting.popleft()
                job.emit(
                    EngineRequestError(
                        f"the prompt plus max_tokens ({need} tokens) exceed what the KV cache "
                        f"holds for one request ({self._kv_tokens} tokens)",
                        param="max_tokens",
                    )
                )
                continue
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            # The free slot whose cached tokens share the longest prefix with this prompt.
            slot = max(free, key=lambda s: (shared_prefix(s.cached, prompt), -s.last_used))
            reserve = len(prompt) + min(job.request.max_tokens, self._growth_reserve)
            if self._unified and not self._make_room(reserve, keep=slot):
                return
            self.waiting.popleft()
            try:
                sampler = self._make_sampler(job.request)
            except Exception as exc:  # this request alone fails (refused: a 400), never lost
                job.emit(exc)
                continue
            self._start(slot, job, sampler, reserve)

    def _idle_caches(self, excluding: Slot | None = None) -> list[Slot]:
        """Idle slots that hold cached KV, least recently used first."""
        idle = [s for s in self.slots if not s.busy and s.cached and s is not excluding]
        return sorted(idle, key=lambda s: s.last_used)

    def _make_room(self, need: int, *, keep: Slot) -> bool:
        """Evict the KV of idle slots, least recently used first, until `need` cells fit; evict
        nothing when even all of it would not make room (the request waits, the caches stay)."""
        idle = self._idle_caches(excluding=keep)
        in_use = self._kv_in_use(excluding=keep)
        if in_use - sum(len(s.cached) for s in idle) + need > self._kv_tokens:
            return False
        while in_use + need > self._kv_tokens:
            slot = idle.pop(0)
            in_use -= len(slot.cached)
            self._clear_cache(slot)
        return True

    def _trim_idle_caches(self) -> None:
        """Idle caches cost every running token a walk over their cells (here, one stream of
        short chats decodes 10-13 % slower beside a dozen idle caches of 180 cells, and eight
        streams 30-50 % slower beside 8000 cells). While requests run, keep only the
        `IDLE_CACHES` most recently used (llama.cpp's server, at its defaults, keeps four
        slots' caches), within `idle_cache_tokens` in all, and for `idle_cache_seconds` at
        most (long enough for an agent's or a chat's next turn)."""
        if not self.running:
            return
        idle = self._idle_caches()
        stale_before = self._now() - self._idle_cache_seconds
        idle_cells = sum(len(s.cached) for s in idle)
        over_pool = self._kv_in_use() - self._kv_tokens
        for left, slot in zip(range(len(idle), 0, -1), idle, strict=True):
            within = idle_cells <= self._idle_cache_tokens and over_pool <= 0
            if within and left <= IDLE_CACHES and slot.idle_since >= stale_before:
                continue
            idle_cells -= len(slot.cached)
            over_pool -= len(slot.cached)
            self._clear_cache(slot)

    def _start(self, slot: Slot, job: Job, sampler: Sampler, reserve: int) -> None:
        prompt = list(job.request.prompt_tokens)
        reuse = self._place(slot, prompt, seeded=job.request.sampling.seed is not None)
        slot.job, slot.next_token, slot.produced = job, None, 0
        slot.reserved = reserve
        slot.sampler = sampler
        slot.last_used = next(self._clock)
        if reuse:
            logger.debug("request {} reuses {} cached prompt tokens", job.request.request_id, reuse)

    def _place(self, slot: Slot, tokens: list[int], *, seeded: bool) -> int:
        """Give `slot` the KV of the longest cached prefix of `tokens` (its own, or copied from
        another slot) and leave the rest pending; return how many tokens were reused."""
        source, shared = self._longest_cached_prefix(tokens, own=slot)
        # At least one token must be evaluated to get the logits for the next sample.
        reuse = min(shared, len(tokens) - 1)
        if seeded:
            reuse -= reuse % self._batch_size  # whole chunks only (see the module docstring)
        memory, lib = self._ctx.memory, self._lib
        if source is not slot and reuse > 0:
            lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            if self._unified:
                lib.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, 0, reuse)
            else:  # another slot's cells live in its own buffer: llama.cpp copies all of it
                lib.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, -1, -1)
                lib.llama_memory_seq_rm(memory, slot.seq_id, reuse, -1)
        else:
            lib.llama_memory_seq_rm(memory, slot.seq_id, reuse, -1)
        slot.cached = tokens[:reuse]
        slot.pending = tokens[reuse:]
        self.prefix_tokens_reused += reuse
        return reuse

    # --- preemption -----------------------------------------------------------------------

    def _resume_preempted(self) -> bool:
        """Give the longest-waiting preempted sequence its cells back when they fit (evicting
        idle caches); False when there is none, or it must wait longer."""
        waiting = [s for s in self.slots if s.busy and s.preempted]
        # Our count of cells errs on the full side, but llama.cpp just found none: only cells
        # freed by a request that ended since are known to be there.
        if not waiting or (self.running and not self._ended_since_preemption):
            return False
        slot = min(waiting, key=lambda s: s.last_used)
        if not self._make_room(len(slot.pending) + 1, keep=slot):
            return False
        assert slot.job is not None
        reuse = self._place(slot, slot.pending, seeded=slot.seeded)
        slot.preempted = False
        slot.reserved = len(slot.cached) + len(slot.pending) + 1
        logger.info(
            "request {} resumes ({} tokens to evaluate again, {} reused)",
            slot.job.request.request_id,
            len(slot.pending),
            reuse,
        )
        return True

    def _free_cells(self) -> bool:
        """llama.cpp found no room for a step: drop every idle cache, or else preempt the most
        recently started sequence (never the only one). False when neither is possible."""
        idle = self._idle_caches()
        for slot in idle:
            self._clear_cache(slot)
        if idle:
            return True
        decoding = [s for s in self.slots if s.decoding]
        if len(decoding) < 2:
            return False
        # The most recently started, unseeded if any: a seeded one read again in chunks would
        # not give the text it gives uninterrupted.
        victim = max(decoding, key=lambda s: (not s.seeded, s.last_used))
        assert victim.job is not None
        fed_back = [victim.next_token] if victim.next_token is not None else []
        self._lib.llama_memory_seq_rm(self._ctx.memory, victim.seq_id, -1, -1)
        victim.pending = victim.cached + fed_back + victim.pending
        victim.cached, victim.next_token, victim.preempted = [], None, True
        self.preemptions += 1
        self._ended_since_preemption = False
        logger.info(
            "the KV cache is full: request {} is preempted, to resume when there is room "
            "({} tokens held)",
            victim.job.request.request_id,
            len(victim.pending),
        )
        return True

    def _longest_cached_prefix(self, prompt: list[int], *, own: Slot) -> tuple[Slot, int]:
        """The slot whose evaluated tokens share the longest prefix with `prompt`, and how long;
        the request's own slot when no other one shares more."""
        best, best_shared = own, shared_prefix(own.cached, prompt)
        for slot in self.slots:
            if slot is not own and (n := shared_prefix(slot.cached, prompt)) > best_shared:
                best, best_shared = slot, n
        return best, best_shared

    # --- one decoding step ----------------------------------------------------------------

    def _decode(self) -> None:
        batch = self._batch
        batch.n_tokens = 0
        picks: list[tuple[Slot, int]] = []  # (slot, batch index of the row to sample)
        added: list[tuple[Slot, list[int]]] = []  # (slot, tokens it put in this batch)
        for slot in self.slots:
            if slot.decoding and slot.next_token is not None:
                picks.append((slot, self._add(slot, [slot.next_token], logits_last=True)))
                added.append((slot, [slot.next_token]))
        budget = self._batch_size - batch.n_tokens
        # The shortest prompts first: a chat's question waits one step, not behind an agent's
        # 15,000 tokens, which take what is left of every step; a prompt left out for
        # STARVED_STEPS steps goes first, so a stream of questions never holds it back.
        prefilling = sorted((s for s in self.slots if s.decoding and s.pending),
                            key=lambda s: (s.starved < STARVED_STEPS, len(s.pending)))  # fmt: skip
        for slot in prefilling:
            if budget <= 0:
                slot.starved += 1
                continue
            slot.starved = 0
            room = budget
            if slot.seeded:
                # Chunks end on multiples of the batch size, so a seeded prompt is cut the
                # same way whether or not part of it was cached.
                room = min(budget, self._batch_size - len(slot.cached) % self._batch_size)
            chunk = slot.pending[:room]
            last = len(chunk) == len(slot.pending)
            index = self._add(slot, chunk, logits_last=last)
            if last:
                picks.append((slot, index))
            added.append((slot, chunk))
            budget -= len(chunk)
        code = self._lib.llama_decode(self._ctx.ctx, batch)
        # 1: no room in the pool for this batch (llama.cpp changed nothing): make some, and the
        # next step tries again.
        if code == 1 and self._unified and self._free_cells():
            return
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        self.evaluated_tokens += batch.n_tokens
        for slot, tokens in added:
            if slot.next_token is None:  # a prompt chunk, not a sampled token fed back
                del slot.pending[: len(tokens)]
            slot.cached.extend(tokens)
            slot.next_token = None
        # llama.cpp's logits rows follow the batch order of the entries that asked for logits.
        picks.sort(key=lambda pick: pick[1])
        rows = [
            Pick(slot.sampler, index, row)  # type: ignore[arg-type]  # busy slots have one
            for row, (slot, index) in enumerate(picks)
        ]
        tokens = self._sample_step(self._ctx.ctx, rows)
        for (slot, _), token in zip(picks, tokens, strict=True):
            self._accept(slot, token)

    def _add(self, slot: Slot, tokens: list[int], *, logits_last: bool) -> int:
        """Append a sequence's tokens to the batch; return the batch index of the last one."""
        batch, position = self._batch, len(slot.cached)
        for offset, token in enumerate(tokens):
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = position + offset
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq_id
            batch.logits[i] = logits_last and offset == len(tokens) - 1
            batch.n_tokens = i + 1
        return int(batch.n_tokens - 1)

    def _accept(self, slot: Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        slot.produced += 1
        request = job.request
        if self._is_eog[token] and not request.sampling.ignore_eos:
            job.emit(TokenChunk((token,), b"", "stop"))
            self._finish(slot)
            return
        out_of_room = slot.produced >= request.max_tokens
        assert slot.sampler is not None
        logprob = slot.sampler.last_logprob
        job.emit(
            TokenChunk(
                (token,),
                self._pieces[token],
                "length" if out_of_room else None,
                (logprob,) if logprob is not None else (),
            )
        )
        if out_of_room:
            self._finish(slot)
        else:
            slot.next_token = token

    # --- endings --------------------------------------------------------------------------

    def _finish(self, slot: Slot) -> None:
        """The request is done or gone; its KV stays cached for prefix reuse."""
        self._release(slot)
        self._ended_since_preemption = True
        if slot.preempted:  # its cells are gone: nothing cached to reuse
            self._clear_cache(slot)
        slot.job, slot.pending, slot.next_token, slot.reserved = None, [], None, 0
        slot.preempted = False
        slot.last_used, slot.idle_since = next(self._clock), self._now()

    def _release(self, slot: Slot) -> None:
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None

    def _clear_cache(self, slot: Slot) -> None:
        self._lib.llama_memory_seq_rm(self._ctx.memory, slot.seq_id, -1, -1)
        slot.cached = []

    def _fail_all(self, error: Exception) -> None:
        for slot in self.slots:
            if slot.job is not None:
                slot.job.emit(error)
                self._finish(slot)
            self._clear_cache(slot)
