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
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from loguru import logger

from vllm_obtain.contract import EngineState, EngineUnavailableError
from vllm_obtain.core.residency import (
    GIB,
    ModelTooLargeError,
    ResidencyPolicy,
    Resident,
    expired,
    expires_at,
    room_for,
)
from vllm_obtain.core.served_model import ServedModel

# available: servable, not loaded; loading; loaded; unloading; failed: its last load failed
# (the next request tries again).
ModelState = Literal["available", "loading", "loaded", "unloading", "failed"]
# How often keep-alive is checked, and a loader waiting for busy models re-checks the room.
RESIDENCY_TICK_SECONDS = 1.0
# /v1/models and requests naming an unknown model look for new models; not more often than this.
REFRESH_SECONDS = 2.0


class UnknownModelError(LookupError):
    """A request named a model this server does not serve."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"The model '{model_id}' does not exist or is not served here.")
        self.model_id = model_id


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
    context_length: int = 0  # tokens a request will be able to hold, as planned; 0: unknown
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
    # Named at start: never dropped from the list, even once unloaded and no longer pinned.
    named: bool = field(init=False)

    def __post_init__(self) -> None:
        self.named = self.source.pinned

    @property
    def id(self) -> str:
        return self.source.id

    @property
    def busy(self) -> bool:
        return self.leases > 0 or (self.served is not None and self.served.in_flight > 0)

    @property
    def context_length(self) -> int | None:
        """Tokens one request may hold (prompt and answer): the loaded engine's figure, else
        the planned one; None when neither is known."""
        if self.served is not None and self.served.info is not None:
            return self.served.info.context_length
        return self.source.context_length or None

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
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = time.monotonic()  # the sources given were found just now
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
        elif (
            entry.state in ("available", "failed") and not entry.loading and not entry.source.pinned
        ):
            entry.source = source

    async def refresh(self, *, force: bool = False) -> None:
        """Pick up what is installed now; a model no longer installed and not loaded goes.
        One scan at a time, and none within REFRESH_SECONDS of the last unless `force`d."""
        if self._discover is None:
            return
        if self._refreshing is None:
            if not force and time.monotonic() - self._refreshed_at < REFRESH_SECONDS:
                return
            self._refreshing = asyncio.ensure_future(self._rediscover(self._discover))
        await asyncio.shield(self._refreshing)

    async def _rediscover(self, discover: Callable[[], list[ModelSource]]) -> None:
        try:
            found = {source.id: source for source in await asyncio.to_thread(discover)}
        finally:
            self._refreshing, self._refreshed_at = None, time.monotonic()
        for source in found.values():
            self.add_source(source)
        for model_id, entry in list(self._entries.items()):
            gone = model_id not in found and not entry.named
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
                await asyncio.sleep(0)  # whatever the states say, never spin
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
                entry.failure = None
                entry.loading = asyncio.create_task(self._load(entry, why))
            loading = entry.loading
            with contextlib.suppress(Exception):  # what went wrong is on the entry
                await asyncio.shield(loading)
            failure = entry.failure
            if failure is not None and entry.loading is None:
                if isinstance(failure, ModelTooLargeError | NoRoomError):
                    raise failure  # a 400 / a 503 of their own
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
        except _Abandoned:
            return  # every request for it left while it waited for room
        except (ModelTooLargeError, NoRoomError) as exc:
            # Not the model's fault: it stays available, and /health healthy.
            entry.failure, entry.error = exc, str(exc)
            logger.warning("not loading {}: {}", entry.id, exc)
            return
        except BaseException as exc:
            await self._load_failed(entry, exc)
            raise
        finally:
            entry.loading = None
        entry.state, entry.error = "loaded", None
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
            if entry.leases == 0:
                raise _Abandoned()
            async with self._room:
                others = [
                    e.resident()
                    for e in self._entries.values()
                    if e is not entry and e.state in ("loading", "loaded", "unloading")
                ]
                room = room_for(entry.id, entry.source.estimated_bytes, others, self.policy)
                if room.fits:
                    await self._evict([self._entries[v] for v in room.evict], room.reason)
                    entry.state = "loading"
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                busy = ", ".join(r.id for r in others if r.busy or r.pinned)
                raise NoRoomError(
                    f"No room to load '{entry.id}': the models in use ({busy}) hold the "
                    "memory budget; retry when they are idle.",
                    retry_after=10,
                )
            await self._change(within=min(left, RESIDENCY_TICK_SECONDS))

    async def _evict(self, victims: list[ModelEntry], reason: str) -> None:
        """Unload `victims`, all marked unloading at once: a request for one of them waits
        for its unload instead of starting on it meanwhile."""
        for victim in victims:
            self._begin_unloading(victim)
        for victim in victims:
            await self._unload(victim, reason=reason)

    async def _load_failed(self, entry: ModelEntry, exc: BaseException) -> None:
        served, entry.served = entry.served, None
        entry.state, entry.failure = "failed", exc
        entry.error = f"{type(exc).__name__}: {exc}"
        if served is not None:  # a child may be up: it must not outlive the failure
            await _stop_engine(entry.id, served)
        self._changed.set()
        if not isinstance(exc, asyncio.CancelledError):
            logger.opt(exception=exc).error("{} failed to load: {}", entry.id, exc)

    async def unload(self, model_id: str, *, reason: str = "admin") -> None:
        """Unload a model once the requests using it have finished (each ends within the
        request timeout); new requests for it wait meanwhile, then load it again. A model
        named at start is from then on loaded on demand, like any other."""
        entry = await self.find(model_id)
        while entry.loading is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(entry.loading)
        if entry.state != "loaded":
            return
        if entry.source.pinned:
            entry.source = dataclasses.replace(entry.source, pinned=False)
        self._begin_unloading(entry)
        try:
            while entry.busy:
                await self._change(within=RESIDENCY_TICK_SECONDS)
            async with self._room:
                await self._unload(entry, reason=reason)
        finally:
            if entry.state == "unloading":  # stopped before it began: it is still loaded
                entry.state = "loaded"
                entry.unloaded.set()

    def _begin_unloading(self, entry: ModelEntry) -> None:
        entry.state = "unloading"
        entry.unloaded.clear()

    async def _unload(self, entry: ModelEntry, *, reason: str) -> None:
        served, memory = entry.served, entry.memory_bytes
        self._begin_unloading(entry)
        try:
            if served is not None:
                await _stop_engine(entry.id, served)
        finally:
            entry.served, entry.state = None, "available"
            entry.unloaded.set()
            self._changed.set()
        entry.unloads[reason] += 1
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
        keep_alive = self.policy.keep_alive
        while True:
            await self._change(within=RESIDENCY_TICK_SECONDS)
            loaded = [e.resident() for e in self._entries.values() if e.state == "loaded"]
            for model_id in expired(loaded, now=time.monotonic(), keep_alive=keep_alive):
                entry = self._entries.get(model_id)
                if entry is None:
                    continue
                async with self._room:  # still idle past its time once the room is ours?
                    now = time.monotonic()
                    if entry.state == "loaded" and expired(
                        [entry.resident()], now=now, keep_alive=keep_alive
                    ):
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
        """Stop every engine, loads and unloads under way included (the server's shutdown)."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        for entry in list(self._entries.values()):
            if entry.loading is not None:
                entry.loading.cancel()
                await asyncio.gather(entry.loading, return_exceptions=True)
            # Every engine, loaded or not: one interrupted mid-load may hold a process already.
            served, entry.served = entry.served, None
            if served is not None:
                await _stop_engine(entry.id, served)
                served.info = None
            entry.state = "available"
            entry.unloaded.set()


class NoRoomError(EngineUnavailableError):
    """Busy models hold the memory budget for longer than a request may wait: retry (503)."""


class _Abandoned(Exception):
    """Every request for a model waiting for room has gone: its load is dropped."""


async def _stop_engine(model_id: str, served: ServedModel) -> None:
    """Unload a model's engine, seen through even if the caller is cancelled meanwhile (its
    worker process must not be left behind); a failure is logged, not raised."""
    stopping = asyncio.ensure_future(served.engine.unload())
    try:
        await asyncio.shield(stopping)
    except asyncio.CancelledError:
        await asyncio.gather(stopping, return_exceptions=True)
        raise
    except Exception as exc:
        logger.opt(exception=exc).error("stopping the engine of {} failed: {}", model_id, exc)


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


_UNLOAD_REASONS = {
    "idle": "idle past its keep-alive",
    "memory": "to make room in the memory budget",
    "count": "to stay within --max-loaded-models",
    "admin": "asked to",
}
