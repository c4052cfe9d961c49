"""Which models stay loaded: the memory budget, the cap on loaded models, and keep-alive.

Pure decisions on plain figures, so every rule is tested without a model: the registry gathers
the figures (what each loaded model holds, whether it is busy, when it was last used) and acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GIB = 1 << 30


class ModelTooLargeError(RuntimeError):
    """A model that cannot be loaded whatever is unloaded: larger than the memory budget, alone
    or beside the models named at start (which stay loaded), or past the count they leave."""

    def __init__(self, model_id: str, message: str) -> None:
        super().__init__(message)
        self.model_id = model_id


def _too_large(model_id: str, needed: int, budget: int, pinned: int) -> ModelTooLargeError:
    beside = (
        f" beside the models named at start ({pinned / GIB:.1f} GiB, kept loaded)"
        if pinned
        else " even with every other model unloaded"
    )
    return ModelTooLargeError(
        model_id,
        f"The model '{model_id}' needs about {needed / GIB:.1f} GiB, more than this server's "
        f"memory budget of {budget / GIB:.1f} GiB holds{beside}; raise --memory-budget, or "
        "lower the model's context (--ctx-size) or parallelism.",
    )


@dataclass(frozen=True)
class ResidencyPolicy:
    memory_budget: int | None = None  # bytes models may hold together; None: no limit
    max_loaded: int = 0  # models loaded at once; 0: no cap
    keep_alive: float = -1  # seconds an idle model stays; -1: for ever; 0: unloaded at once


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now: loaded, or loading (counted at its estimate)."""

    id: str
    charge: int  # bytes it is counted for
    busy: bool  # requests hold it (in flight, or about to be)
    last_used: float  # monotonic seconds
    pinned: bool = False  # named at start: never unloaded to make room or for idleness


@dataclass(frozen=True)
class Room:
    """What loading a model takes: the residents to unload first, or why it must wait."""

    evict: tuple[str, ...]
    fits: bool  # False: even after evicting every idle model there is no room yet
    reason: str = ""  # why the evictions (for the log): "memory" or "count"


def room_for(
    model_id: str, needed: int, residents: Sequence[Resident], policy: ResidencyPolicy
) -> Room:
    """The idle models to unload, least recently used first, so that a model needing `needed`
    bytes fits the budget and the count; `fits` is False (and nothing is to be unloaded) when
    busy models leave too little room for now. Raises ModelTooLargeError when it could never
    fit, pinned models being there to stay."""
    budget = policy.memory_budget
    pinned = [r for r in residents if r.pinned]
    held_for_good = sum(r.charge for r in pinned)
    if budget is not None and needed + held_for_good > budget:
        raise _too_large(model_id, needed, budget, held_for_good)
    if policy.max_loaded > 0 and len(pinned) + 1 > policy.max_loaded:
        raise ModelTooLargeError(
            model_id,
            f"The model '{model_id}' cannot be loaded: the {len(pinned)} models named at start "
            f"take all of --max-loaded-models {policy.max_loaded}.",
        )
    used = sum(r.charge for r in residents)
    count = len(residents)
    evict: list[str] = []
    reason = ""
    candidates = sorted((r for r in residents if not r.busy and not r.pinned), key=_lru)
    for resident in candidates:
        over_memory = budget is not None and used + needed > budget
        over_count = policy.max_loaded > 0 and count + 1 > policy.max_loaded
        if not (over_memory or over_count):
            break
        reason = reason or ("memory" if over_memory else "count")
        evict.append(resident.id)
        used -= resident.charge
        count -= 1
    fits = (budget is None or used + needed <= budget) and (
        policy.max_loaded <= 0 or count + 1 <= policy.max_loaded
    )
    # Nothing is unloaded for a load that must wait anyway: busy models may free room first.
    return Room(tuple(evict), True, reason) if fits else Room((), False)


def _lru(resident: Resident) -> float:
    return resident.last_used


def expired(residents: Sequence[Resident], *, now: float, keep_alive: float) -> list[str]:
    """The idle, unpinned models whose keep-alive has run out."""
    if keep_alive < 0:
        return []
    return [
        r.id for r in residents if not r.busy and not r.pinned and now - r.last_used >= keep_alive
    ]


def expires_at(resident: Resident, keep_alive: float) -> float | None:
    """When an idle model will be unloaded (monotonic seconds); None: not while it is busy,
    pinned, or kept for ever."""
    if keep_alive < 0 or resident.busy or resident.pinned:
        return None
    return resident.last_used + keep_alive
