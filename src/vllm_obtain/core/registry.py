"""Which models are served, under which id, on which engine; loading them when a request names
them, and unloading them when they idle past their keep-alive or another model needs the room.

Each servable model is a ModelEntry: its ModelSource (how to bring it up, what it will take) and,
while loaded, its ServedModel on an engine of its own. Requests hold a Lease on the model they
use, so a model in use is never unloaded under them. What may stay loaded is decided by the pure
rules of core.residency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loguru import logger

from vllm_obtain.contract import Engine, EngineState, EngineUnavailableError, ModelInfo
from vllm_obtain.core.residency import (
    GIB,
    ModelTooLargeError,
    ResidencyPolicy,
    Resident,
    expired,
    expires_at,
    room_for,
)
from vllm_obtain.core.templates import ChatTemplateError, render_chat_prompt
from vllm_obtain.core.tools import messages_with_tools, plain_messages, template_renders_tools

# available: servable, not loaded; loading; loaded; unloading; failed: its last load failed
# (the next request tries again).
ModelState = Literal["available", "loading", "loaded", "unloading", "failed"]
# How often keep-alive is checked, and a loader waiting for busy models re-checks the room.
RESIDENCY_TICK_SECONDS = 1.0


class UnknownModelError(LookupError):
    """A request named a model this server does not serve."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"The model '{model_id}' does not exist or is not served here.")
        self.model_id = model_id


class QueueFullError(RuntimeError):
    """More requests than the model runs and queues at once: the client should retry (429)."""

    def __init__(self, model_id: str, retry_after: int = 2) -> None:
        super().__init__(
            f"The model '{model_id}' is at capacity: too many requests are waiting. "
            "Retry after a short wait."
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class ServingLimits:
    """What one model accepts; 0 means 'as far as the context goes'."""

    max_queue: int = 256  # sequences that may wait beyond those the engine runs at once
    request_timeout: float = 600.0  # seconds, queueing included
    max_prompt_tokens: int = 0
    max_tokens: int = 0


@dataclass
class ServedModel:
    id: str
    engine: Engine
    info: ModelInfo | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm-obtain"
    chat_template: str | None = None  # replaces the model's own (--chat-template)
    limits: ServingLimits = field(default_factory=ServingLimits)
    in_flight: int = 0  # sequences admitted and not finished, running or waiting
    load_error: str | None = None

    @property
    def state(self) -> EngineState:
        if self.info is None:
            return "failed" if self.load_error is not None else "loading"
        return self.engine.state

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.engine.max_running)

    def admit(self, sequences: int) -> None:
        """Take room for `sequences` more, or refuse: the queue is bounded, not the backlog."""
        if self.in_flight + sequences > self.engine.max_running + self.limits.max_queue:
            raise QueueFullError(self.id)
        self.in_flight += sequences

    def release(self, sequences: int) -> None:
        self.in_flight -= sequences

    @property
    def loaded_info(self) -> ModelInfo:
        if self.info is None:
            raise RuntimeError(f"model {self.id} is not loaded")
        return self.info

    async def chat_prompt_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> list[int]:
        """Render a conversation (and the tools offered) with the model's own chat template
        and tokenize it."""
        info = self.loaded_info
        template = self.chat_template or info.chat_template
        if template is None:
            raise ChatTemplateError(
                f"The model '{self.id}' has no chat template; use /v1/completions, or serve it "
                "with --chat-template."
            )
        if not template_renders_tools(template):
            messages = messages_with_tools(messages, tools) if tools else plain_messages(messages)
            tools = ()
        prompt = render_chat_prompt(
            template, messages, bos_token=info.bos_token, eos_token=info.eos_token, tools=tools
        )
        # The template writes any BOS the model wants itself, as transformers assumes.
        return await self.engine.tokenize(prompt, add_special=False)


@dataclass(frozen=True)
class ModelSource:
    """A model this server can serve, before it is loaded: its id, what it will take, and how
    to make it (`build` resolves the weights, which may convert them: it runs in a thread)."""

    id: str
    engine: str  # the engine's name, known before loading
    build: Callable[[], ServedModel]
    format: str = ""  # gguf, hf or alias
    size_bytes: int = 0  # on disk
    estimated_bytes: int = 0  # memory it will take once loaded (weights, KV cache, runtime)
    pinned: bool = False  # named at start: loaded then, never unloaded for room or idleness


@dataclass
class ModelEntry:
    """One servable model and where it stands."""

    source: ModelSource
    state: ModelState = "available"
    served: ServedModel | None = None
    error: str | None = None
    failure: BaseException | None = None  # what its last load raised
    leases: int = 0  # requests that named it and have not finished
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0
    unloads: Counter[str] = field(default_factory=Counter)  # by reason
    loading: asyncio.Task[None] | None = None  # its load, while under way
    unloaded: asyncio.Event = field(
        default_factory=lambda: _set(asyncio.Event())
    )  # set: not unloading
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm-obtain"

    @property
    def id(self) -> str:
        return self.source.id

    @property
    def busy(self) -> bool:
        return self.leases > 0 or (self.served is not None and self.served.in_flight > 0)

    @property
    def memory_bytes(self) -> int | None:
        """What its engine process holds now, where the engine can tell."""
        if self.served is None:
            return None
        measured = self.served.engine.stats().get("memory_bytes")
        return int(measured) if measured else None

    @property
    def charge(self) -> int:
        """What it counts for against the budget: its estimate, or more if it took more."""
        return max(self.source.estimated_bytes, self.memory_bytes or 0)

    def resident(self) -> Resident:
        # One loading or unloading counts as busy: it is not to be unloaded by anyone else.
        busy = self.busy or self.state != "loaded"
        return Resident(self.id, self.charge, busy, self.last_used, self.source.pinned)


@dataclass(frozen=True)
class ModelStatus:
    """One model as /admin/models reports it (times in Unix seconds)."""

    id: str
    state: ModelState
    engine: str
    format: str
    size_bytes: int
    estimated_bytes: int
    memory_bytes: int | None
    pinned: bool
    last_used: float | None
    expires_at: float | None
    error: str | None
    loads: int
    unloads: dict[str, int]
    engine_state: EngineState | None  # the engine's own, while loaded


class Lease:
    """A request's hold on a loaded model: while any is held the model is not unloaded."""

    def __init__(self, registry: ModelRegistry, entry: ModelEntry, model: ServedModel) -> None:
        self.model = model
        self._registry, self._entry = registry, entry
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._registry._released(self._entry)


class ModelRegistry:
    """The models this server answers for, by id: loaded at start (pinned) or on demand."""

    def __init__(
        self,
        models: Sequence[ServedModel] = (),
        *,
        sources: Sequence[ModelSource] = (),
        policy: ResidencyPolicy | None = None,
        discover: Callable[[], list[ModelSource]] | None = None,
        wait_timeout: float = 600.0,
    ) -> None:
        """`models` are served as given, pinned (tests, in-process engines); `sources` are made
        when first needed; `discover` finds what is installed now (a new pull, a file dropped
        into models/), and runs in a thread."""
        self.policy = policy or ResidencyPolicy()
        self._entries: dict[str, ModelEntry] = {}
        for model in models:
            self.add(model)
        for source in sources:
            self.add_source(source)
        self._discover = discover
        self._wait_timeout = wait_timeout
        self._room = asyncio.Lock()  # one decision about memory at a time
        self._changed = asyncio.Event()  # a model became idle or was unloaded
        self._keeper: asyncio.Task[None] | None = None

    # --- what is servable ---------------------------------------------------------------------

    def add(self, model: ServedModel) -> None:
        """Serve `model` as it is, pinned (loaded by load_all)."""
        source = ModelSource(model.id, model.engine.name, lambda: model, pinned=True)
        self._entries[model.id] = ModelEntry(source)

    def add_source(self, source: ModelSource) -> None:
        """Make a model servable; a model of that id already loaded keeps its source."""
        entry = self._entries.get(source.id)
        if entry is None:
            self._entries[source.id] = ModelEntry(source)
        elif entry.state in ("available", "failed") and not entry.source.pinned:
            entry.source = source

    async def refresh(self) -> None:
        """Pick up what is installed now; a model no longer installed and not loaded goes."""
        if self._discover is None:
            return
        found = {source.id: source for source in await asyncio.to_thread(self._discover)}
        for source in found.values():
            self.add_source(source)
        for model_id, entry in list(self._entries.items()):
            gone = model_id not in found and not entry.source.pinned
            if gone and entry.state in ("available", "failed") and entry.loading is None:
                del self._entries[model_id]

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def all(self) -> list[ServedModel]:
        """The models that hold an engine now (loading, loaded or unloading)."""
        return [e.served for e in self._entries.values() if e.served is not None]

    def loaded(self) -> list[ServedModel]:
        return [m for m in self.all() if m.info is not None]

    async def find(self, model_id: str) -> ModelEntry:
        """The entry of `model_id`, looking for newly installed models once before giving up."""
        entry = self._entries.get(model_id)
        if entry is None:
            await self.refresh()
            entry = self._entries.get(model_id)
        if entry is None:
            raise UnknownModelError(model_id)
        return entry

    def status(self) -> list[ModelStatus]:
        wall = time.time() - time.monotonic()  # monotonic -> Unix seconds
        keep_alive = self.policy.keep_alive
        reports = []
        for entry in self._entries.values():
            held = entry.state in ("loaded", "loading", "unloading")
            until = expires_at(entry.resident(), keep_alive) if entry.state == "loaded" else None
            reports.append(
                ModelStatus(
                    id=entry.id,
                    state=entry.state,
                    engine=entry.source.engine,
                    format=entry.source.format,
                    size_bytes=entry.source.size_bytes,
                    estimated_bytes=entry.source.estimated_bytes,
                    memory_bytes=entry.memory_bytes if held else None,
                    pinned=entry.source.pinned,
                    last_used=wall + entry.last_used if entry.loads else None,
                    expires_at=None if until is None else wall + until,
                    error=entry.error,
                    loads=entry.loads,
                    unloads=dict(entry.unloads),
                    engine_state=entry.served.state if entry.served is not None else None,
                )
            )
        return reports

    # --- requests ----------------------------------------------------------------------------

    async def acquire(self, model_id: str, *, why: str = "a request named it") -> Lease:
        """Hold `model_id` for a request, loading it first if need be (the request waits);
        `why` it is loaded goes to the log."""
        while True:
            entry = await self.find(model_id)
            if entry.state == "unloading":  # no new request for it: it loads again afterwards
                await entry.unloaded.wait()
                continue
            entry.leases += 1
            try:
                model = await self._loaded(entry, why)
            except BaseException:
                self._released(entry)
                raise
            return Lease(self, entry, model)

    async def _loaded(self, entry: ModelEntry, why: str) -> ServedModel:
        while True:
            served = entry.served
            if entry.state in ("loaded", "unloading") and served is not None:
                return served
            if entry.loading is None:
                entry.loading = asyncio.create_task(self._load(entry, why))
            loading = entry.loading
            with contextlib.suppress(Exception):  # the entry's state and error say it
                await asyncio.shield(loading)
            if entry.state == "failed" and entry.loading is None:
                if isinstance(entry.failure, ModelTooLargeError):
                    raise entry.failure  # a 400: no retry makes it fit
                raise EngineUnavailableError(
                    f"The model '{entry.id}' could not be loaded: {entry.error}", retry_after=10
                )

    def _released(self, entry: ModelEntry) -> None:
        entry.leases -= 1
        entry.last_used = time.monotonic()
        self._changed.set()

    # --- loading and unloading ---------------------------------------------------------------

    async def load(self, model_id: str) -> None:
        """Load a model now (POST /admin/models/{id}/load): it then idles like any other."""
        (await self.acquire(model_id, why="asked to")).release()

    async def _load(self, entry: ModelEntry, why: str) -> None:
        try:
            await self._make_room(entry)
            started = time.perf_counter()
            served = await asyncio.to_thread(entry.source.build)
            entry.served = served
            served.info = await served.engine.load()
        except BaseException as exc:
            await self._failed(entry, exc)
            raise
        finally:
            entry.loading = None
        entry.state, entry.error, entry.failure = "loaded", None, None
        entry.loads += 1
        entry.last_used = time.monotonic()
        memory = entry.memory_bytes
        logger.info(
            "loaded {} on {} in {:.1f}s ({}; {}; estimated {:.2f} GiB)",
            entry.id,
            served.engine.name,
            time.perf_counter() - started,
            why,
            "memory unknown" if memory is None else f"holds {memory / GIB:.2f} GiB",
            entry.source.estimated_bytes / GIB,
        )

    async def _make_room(self, entry: ModelEntry) -> None:
        """Unload idle models (least recently used first) until `entry` fits the budget and
        the count; wait, up to the request timeout, while busy models leave too little."""
        deadline = time.monotonic() + self._wait_timeout
        while True:
            async with self._room:
                others = [
                    e.resident()
                    for e in self._entries.values()
                    if e is not entry and e.state in ("loading", "loaded", "unloading")
                ]
                room = room_for(entry.id, entry.source.estimated_bytes, others, self.policy)
                for victim in room.evict:
                    await self._unload(self._entries[victim], reason=room.reason)
                if room.fits:
                    entry.state = "loading"
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                busy = ", ".join(r.id for r in others if r.busy or r.pinned)
                raise EngineUnavailableError(
                    f"No room to load '{entry.id}': the models in use ({busy}) hold the "
                    "memory budget; retry when they are idle.",
                    retry_after=10,
                )
            await self._change(within=min(left, RESIDENCY_TICK_SECONDS))

    async def _failed(self, entry: ModelEntry, exc: BaseException) -> None:
        served, entry.served = entry.served, None
        entry.state, entry.failure = "failed", exc
        entry.error = f"{type(exc).__name__}: {exc}"
        if served is not None:  # a child may be up: it must not outlive the failure
            with contextlib.suppress(Exception):
                await served.engine.unload()
        self._changed.set()
        if isinstance(exc, ModelTooLargeError):
            logger.warning("not loading {}: {}", entry.id, exc)
        elif not isinstance(exc, asyncio.CancelledError):
            logger.opt(exception=exc).error("{} failed to load: {}", entry.id, exc)

    async def unload(self, model_id: str, *, reason: str = "admin") -> None:
        """Unload a model once the requests using it have finished; new requests for it wait
        meanwhile, then load it again."""
        entry = await self.find(model_id)
        while entry.loading is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(entry.loading)
        if entry.state != "loaded":
            return
        self._begin_unloading(entry)
        try:
            while entry.busy:
                await self._change(within=RESIDENCY_TICK_SECONDS)
            async with self._room:
                await self._unload(entry, reason=reason)
        finally:
            entry.unloaded.set()

    def _begin_unloading(self, entry: ModelEntry) -> None:
        entry.state = "unloading"
        entry.unloaded.clear()

    async def _unload(self, entry: ModelEntry, *, reason: str) -> None:
        served = entry.served
        self._begin_unloading(entry)
        memory = entry.memory_bytes
        try:
            if served is not None:
                await served.engine.unload()
        finally:
            entry.served, entry.state = None, "available"
            entry.unloaded.set()
        entry.unloads[reason] += 1
        self._changed.set()
        held = "" if memory is None else f", freeing {memory / GIB:.2f} GiB"
        logger.info("unloaded {} ({}{})", entry.id, _UNLOAD_REASONS.get(reason, reason), held)

    async def _change(self, *, within: float) -> None:
        """Wait until a model becomes idle or is unloaded, or `within` seconds pass."""
        self._changed.clear()
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
            # meets the event being set, and the server's shutdown would wait for ever.
            await asyncio.wait({waiter}, timeout=within)
        finally:
            waiter.cancel()

    async def _keep_alive(self) -> None:
        """Unload models idle past the keep-alive."""
        while True:
            await self._change(within=RESIDENCY_TICK_SECONDS)
            loaded = [e.resident() for e in self._entries.values() if e.state == "loaded"]
            now = time.monotonic()
            for model_id in expired(loaded, now=now, keep_alive=self.policy.keep_alive):
                entry = self._entries.get(model_id)
                if entry is None or entry.state != "loaded" or entry.busy:
                    continue
                async with self._room:
                    if entry.state == "loaded" and not entry.busy:
                        await self._unload(entry, reason="idle")

    # --- the server's life -------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load the pinned models (those named at start) in turn, then watch keep-alive; one
        that fails is marked failed and the error raised."""
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_alive())
        for entry in list(self._entries.values()):
            if entry.source.pinned and entry.state in ("available", "failed"):
                entry.leases += 1
                try:
                    await self._loaded(entry, "named at start")
                finally:
                    self._released(entry)

    async def unload_all(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        for entry in self._entries.values():
            if entry.loading is not None:
                entry.loading.cancel()
                with contextlib.suppress(BaseException):
                    await entry.loading
            # Every engine, loaded or not: one interrupted mid-load may hold a process already.
            if entry.served is not None:
                await entry.served.engine.unload()
                entry.served.info = None
                entry.served = None
            entry.state = "available"


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


_UNLOAD_REASONS = {
    "idle": "idle past its keep-alive",
    "memory": "to make room in the memory budget",
    "count": "to stay within --max-loaded-models",
    "admin": "asked to",
}
