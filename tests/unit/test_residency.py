"""The rules of what stays loaded: budget, count, least recently used, keep-alive."""

from __future__ import annotations

import pytest

from vllm_obtain.core.residency import (
    GIB,
    ModelTooLargeError,
    ResidencyPolicy,
    Resident,
    expired,
    expires_at,
    room_for,
)


def resident(name: str, gib: float, *, used: float, busy: bool = False, pinned: bool = False):
    return Resident(name, int(gib * GIB), busy, used, pinned)


def test_a_model_that_fits_evicts_nothing():
    room = room_for("c", 2 * GIB, [resident("a", 2, used=1)], ResidencyPolicy(6 * GIB))
    assert room.fits and room.evict == ()


def test_least_recently_used_idle_model_goes_first_and_only_as_many_as_needed():
    residents = [resident("a", 2, used=5), resident("b", 2, used=1), resident("c", 2, used=3)]
    room = room_for("d", 3 * GIB, residents, ResidencyPolicy(6 * GIB))
    assert room.fits and room.evict == ("b", "c") and room.reason == "memory"


def test_busy_and_pinned_models_are_never_evicted_so_the_load_must_wait():
    residents = [resident("a", 3, used=1, busy=True), resident("b", 3, used=0, pinned=True)]
    room = room_for("c", 2 * GIB, residents, ResidencyPolicy(7 * GIB))
    assert not room.fits and room.evict == ()


def test_the_count_cap_evicts_too():
    residents = [resident("a", 1, used=2), resident("b", 1, used=1)]
    room = room_for("c", GIB, residents, ResidencyPolicy(None, max_loaded=2))
    assert room.fits and room.evict == ("b",) and room.reason == "count"


def test_a_model_larger_than_the_whole_budget_is_refused_naming_both_sizes():
    with pytest.raises(ModelTooLargeError, match=r"needs about 9\.0 GiB.*budget of 8\.0 GiB"):
        room_for("big", 9 * GIB, [], ResidencyPolicy(8 * GIB))


def test_keep_alive_expires_idle_unpinned_models_only():
    residents = [
        resident("idle", 1, used=0),
        resident("recent", 1, used=250),
        resident("busy", 1, used=0, busy=True),
        resident("pinned", 1, used=0, pinned=True),
    ]
    assert expired(residents, now=300, keep_alive=300) == ["idle"]
    assert expired(residents, now=300, keep_alive=-1) == []
    assert expired(residents, now=250, keep_alive=0) == ["idle", "recent"]
    assert expires_at(residents[1], 300) == 550
    assert expires_at(residents[2], 300) is None
    assert expires_at(residents[3], 300) is None


def test_models_named_at_start_stay_so_a_model_that_cannot_fit_beside_them_is_refused_at_once():
    pinned = [resident("start", 5, used=0, pinned=True)]
    with pytest.raises(ModelTooLargeError, match=r"beside the models named at start \(5\.0 GiB"):
        room_for("big", 4 * GIB, pinned, ResidencyPolicy(8 * GIB))
    with pytest.raises(ModelTooLargeError, match="take all of --max-loaded-models 1"):
        room_for("other", GIB, pinned, ResidencyPolicy(None, max_loaded=1))


def test_nothing_is_unloaded_for_a_load_that_must_wait_anyway():
    residents = [resident("busy", 6, used=0, busy=True), resident("idle", 2, used=0)]
    room = room_for("c", 5 * GIB, residents, ResidencyPolicy(10 * GIB))
    assert not room.fits and room.evict == ()
