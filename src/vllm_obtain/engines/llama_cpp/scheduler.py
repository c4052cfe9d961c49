"""Continuous batching over one llama.cpp context, the way llama.cpp's own server uses slots.

Every step packs one `llama_decode` call with the next token of each running sequence, then fills
the rest of the batch with prompt chunks of sequences still prefilling, so a long prompt never
stalls the others' decoding. A request joins at the next step and leaves when done. All the rows
of a step are sampled together (step_sampling), and what the step produced for every sequence
leaves in one hand-over (`flush`), so the per-token work stays off the per-sequence path.

The KV cache is split evenly among the slots by default, as llama.cpp's server does with
--parallel: a token attends only over its own slot's cells. With `unified`, it is one pool
shared by all slots, so one request may use far more than its share; a request is then
admitted only when its prompt plus max_tokens fits in what is free (idle slots' caches are
evicted, least recently used first), so a running sequence never runs out of room.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from vllm_obtain.contract import EngineRequestError, GenerationRequest, TokenChunk
from vllm_obtain.engines.engine_thread import Job
from vllm_obtain.engines.llama_cpp.step_sampling import Pick, Sampler, StepSampler, sample_each


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
    reserved: int = 0  # KV cells held for this request: prompt + max_tokens
    produced: int = 0
    last_used: int = 0

    @property
    def busy(self) -> bool:
        return self.job is not None


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
        sample_step: StepSampler = sample_each,
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self._lib, self._ctx, self._make_sampler = lib, ctx, make_sampler
        self._sample_step, self._flush = sample_step, flush
        self._pieces, self._is_eog = pieces, is_eog
        # Unified: the whole pool; split: each slot's own share.
        self._kv_tokens, self._batch_size, self._unified = kv_tokens, batch_size, unified
        self._batch = lib.llama_batch_init(batch_size, 0, 1)
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.waiting: deque[Job] = deque()
        self.prefix_tokens_reused = 0  # prompt tokens served from cache instead of recomputed
        self._clock = itertools.count()

    @property
    def running(self) -> int:
        return sum(slot.busy for slot in self.slots)

    @property
    def kv_reserved(self) -> int:
        """KV cells promised to running requests (what admission counts against the pool)."""
        return sum(s.reserved for s in self.slots if s.busy)

    def close(self) -> None:
        for slot in self.slots:
            self._release(slot)
        self._lib.llama_batch_free(self._batch)

    def serve(self, jobs: queue.Queue[Job | None]) -> None:
        """The engine loop: take new jobs, admit what fits, run one step; until told to stop."""
        while True:
            idle = not self.running and not self.waiting
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

    def _kv_in_use(self, excluding: Slot) -> int:
        return sum(
            s.reserved if s.busy else len(s.cached) for s in self.slots if s is not excluding
        )

    def _admit(self) -> None:
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
            if self._unified and not self._make_room(need, keep=slot):
                return
            self.waiting.popleft()
            try:
                sampler = self._make_sampler(job.request)
            except Exception as exc:  # this request alone fails (refused: a 400), never lost
                job.emit(exc)
                continue
            self._start(slot, job, sampler)

    def _make_room(self, need: int, *, keep: Slot) -> bool:
        """Evict the KV of idle slots, least recently used first, until `need` cells fit; evict
        nothing when even all of it would not make room (the request waits, the caches stay)."""
        idle = sorted((s for s in self.slots if not s.busy and s is not keep and s.cached),
                      key=lambda s: s.last_used)  # fmt: skip
        in_use = self._kv_in_use(excluding=keep)
        if in_use - sum(len(s.cached) for s in idle) + need > self._kv_tokens:
            return False
        while in_use + need > self._kv_tokens:
            slot = idle.pop(0)
            in_use -= len(slot.cached)
            self._clear_cache(slot)
        return True

    def _start(self, slot: Slot, job: Job, sampler: Sampler) -> None:
        prompt = list(job.request.prompt_tokens)
        source, shared = self._longest_cached_prefix(prompt, own=slot)
        # At least one prompt token must be evaluated to get the logits for the first sample.
        reuse = min(shared, len(prompt) - 1)
        if job.request.sampling.seed is not None:
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
        slot.cached = prompt[:reuse]
        slot.pending = prompt[reuse:]
        slot.job, slot.next_token, slot.produced = job, None, 0
        slot.reserved = len(prompt) + job.request.max_tokens
        slot.sampler = sampler
        slot.last_used = next(self._clock)
        if reuse:
            self.prefix_tokens_reused += reuse
            logger.debug(
                "request {} reuses {} cached prompt tokens{}",
                job.request.request_id,
                reuse,
                "" if source is slot else f" (copied from slot {source.seq_id})",
            )

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
            if slot.busy and slot.next_token is not None:
                picks.append((slot, self._add(slot, [slot.next_token], logits_last=True)))
                added.append((slot, [slot.next_token]))
        budget = self._batch_size - batch.n_tokens
        for slot in self.slots:
            if budget <= 0:
                break
            if slot.busy and slot.pending:
                # Chunks end on multiples of the batch size, so a prompt is cut the same way
                # whether or not part of it was cached.
                room = min(budget, self._batch_size - len(slot.cached) % self._batch_size)
                chunk, slot.pending = slot.pending[:room], slot.pending[room:]
                index = self._add(slot, chunk, logits_last=not slot.pending)
                if not slot.pending:
                    picks.append((slot, index))
                added.append((slot, chunk))
                budget -= len(chunk)
        code = self._lib.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        for slot, tokens in added:
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
        slot.job, slot.pending, slot.next_token, slot.reserved = None, [], None, 0
        slot.last_used = next(self._clock)

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
