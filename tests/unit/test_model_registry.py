"""Loading on demand, unloading for room or idleness, and what requests hold, on scripted
engines (the real engines' loads and evictions are in tests/integration/test_many_models.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from tests.scripted_engine import ScriptedEngine
from vllm_obtain.contract import EngineUnavailableError
from vllm_obtain.core.registry import ModelRegistry, ModelSource, UnknownModelError
from vllm_obtain.core.residency import GIB, ModelTooLargeError, ResidencyPolicy
from vllm_obtain.core.served_model import ServedModel


class CountedEngine(ScriptedEngine):
    """A scripted engine that counts its loads and unloads."""

    def __init__(self, log: list[str], name: str, *, fail: bool = False) -> None:
        super().__init__()
        self.log, self.model_name, self.fail = log, name, fail

    async def load(self):
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("broken weights")
        self.log.append(f"load {self.model_name}")
        return await super().load()

    async def unload(self) -> None:
        self.log.append(f"unload {self.model_name}")


def source(
    name: str, log: list[str], gib: float = 1, *, fails: Callable[[], bool] = lambda: False
) -> ModelSource:
    def build() -> ServedModel:
        return ServedModel(id=name, engine=CountedEngine(log, name, fail=fails()))

    return ModelSource(name, "scripted", build, estimated_bytes=int(gib * GIB))


def registry(*sources: ModelSource, **policy: float) -> ModelRegistry:
    return ModelRegistry(sources=sources, policy=ResidencyPolicy(**policy))  # type: ignore[arg-type]


def states(models: ModelRegistry) -> dict[str, str]:
    return {s.id: s.state for s in models.status()}


async def use(models: ModelRegistry, name: str) -> None:
    (await models.acquire(name)).release()


def test_a_model_loads_when_first_asked_for_and_once_for_concurrent_requests():
    log: list[str] = []
    models = registry(source("a", log), source("b", log))

    async def scenario() -> None:
        assert states(models) == {"a": "available", "b": "available"}
        leases = await asyncio.gather(*(models.acquire("a") for _ in range(5)))
        assert {lease.model.id for lease in leases} == {"a"}
        for lease in leases:
            lease.release()
        assert states(models) == {"a": "loaded", "b": "available"}

    asyncio.run(scenario())
    assert log == ["load a"]


def test_an_unknown_model_is_unknown():
    with pytest.raises(UnknownModelError):
        asyncio.run(registry().acquire("nope"))


def test_the_least_recently_used_idle_model_makes_room():
    log: list[str] = []
    models = registry(*(source(n, log, 2) for n in "abc"), memory_budget=5 * GIB)

    async def scenario() -> None:
        for name in ("a", "b", "a", "c"):
            await use(models, name)

    asyncio.run(scenario())
    assert log == ["load a", "load b", "unload b", "load c"]
    assert states(asyncio.run(_same(models))) == {"a": "loaded", "b": "available", "c": "loaded"}
    assert next(s for s in models.status() if s.id == "b").unloads == {"memory": 1}


async def _same(models: ModelRegistry) -> ModelRegistry:
    return models


def test_a_model_in_use_is_not_evicted_the_load_waits_until_one_is_idle():
    log: list[str] = []
    models = registry(*(source(n, log, 2) for n in "abc"), memory_budget=5 * GIB)

    async def scenario() -> None:
        a, b = await models.acquire("a"), await models.acquire("b")
        waiting = asyncio.create_task(models.acquire("c"))
        await asyncio.sleep(0.3)
        assert not waiting.done() and "unload a" not in log
        a.release()
        (await asyncio.wait_for(waiting, 5)).release()
        b.release()

    asyncio.run(scenario())
    assert log == ["load a", "load b", "unload a", "load c"]


def test_the_count_cap_unloads_too():
    log: list[str] = []
    models = registry(*(source(n, log) for n in "ab"), max_loaded=1)
    asyncio.run(_use_all(models, "ab"))
    assert log == ["load a", "unload a", "load b"]


async def _use_all(models: ModelRegistry, names: str) -> None:
    for name in names:
        await use(models, name)


def test_keep_alive_zero_unloads_right_after_the_last_request():
    log: list[str] = []
    models = registry(source("a", log), keep_alive=0)

    async def scenario() -> None:
        await models.load_all()  # starts the keep-alive watch
        await use(models, "a")
        for _ in range(50):
            if states(models)["a"] == "available":
                break
            await asyncio.sleep(0.1)
        await models.unload_all()

    asyncio.run(scenario())
    assert log == ["load a", "unload a"]
    assert models.status()[0].unloads == {"idle": 1}


def test_pinned_models_stay_whatever_the_keep_alive():
    log: list[str] = []
    engine = CountedEngine(log, "p")
    models = ModelRegistry(
        [ServedModel(id="p", engine=engine)], policy=ResidencyPolicy(keep_alive=0)
    )

    async def scenario() -> None:
        await models.load_all()
        await use(models, "p")
        await asyncio.sleep(1.5)
        assert states(models) == {"p": "loaded"}
        await models.unload_all()

    asyncio.run(scenario())


def test_a_failed_load_is_reported_and_the_next_request_tries_again():
    log: list[str] = []
    attempts = iter([True, False])
    models = registry(source("a", log, fails=lambda: next(attempts)))
    with pytest.raises(EngineUnavailableError, match="could not be loaded: RuntimeError: broken"):
        asyncio.run(models.acquire("a"))
    assert states(models) == {"a": "failed"}
    asyncio.run(use(models, "a"))
    assert states(models) == {"a": "loaded"} and log == ["unload a", "load a"]


def test_unload_waits_for_the_requests_in_flight():
    log: list[str] = []
    models = registry(source("a", log))

    async def scenario() -> None:
        lease = await models.acquire("a")
        unloading = asyncio.create_task(models.unload("a"))
        await asyncio.sleep(0.3)
        assert states(models) == {"a": "unloading"} and not unloading.done()
        lease.release()
        await asyncio.wait_for(unloading, 5)

    asyncio.run(scenario())
    assert log == ["load a", "unload a"] and states(models) == {"a": "available"}


def test_refresh_adds_new_models_and_drops_those_gone():
    log: list[str] = []
    installed = [source("a", log)]
    models = ModelRegistry(sources=installed, discover=lambda: list(installed))
    installed[:] = [source("b", log)]
    asyncio.run(models.refresh(force=True))
    assert states(models) == {"b": "available"}
    asyncio.run(use(models, "b"))
    installed.clear()
    asyncio.run(models.refresh(force=True))
    assert states(models) == {"b": "loaded"}  # a loaded model stays until it is unloaded


class SlowUnload(CountedEngine):
    async def unload(self) -> None:
        await asyncio.sleep(0.5)
        await super().unload()


def test_a_request_arriving_while_its_model_unloads_waits_and_loads_it_again():
    log: list[str] = []

    def build() -> ServedModel:
        return ServedModel(id="a", engine=SlowUnload(log, "a"))

    models = registry(ModelSource("a", "scripted", build), keep_alive=0)

    async def scenario() -> None:
        await models.load_all()  # the keep-alive watch
        await use(models, "a")
        for _ in range(50):
            if states(models)["a"] == "unloading":
                break
            await asyncio.sleep(0.05)
        assert states(models)["a"] == "unloading"
        lease = await asyncio.wait_for(models.acquire("a"), 5)
        assert states(models)["a"] == "loaded"
        lease.release()
        await models.unload_all()

    asyncio.run(scenario())
    assert log[:3] == ["load a", "unload a", "load a"]


def test_the_models_unloaded_to_make_room_take_no_new_request_meanwhile():
    log: list[str] = []

    def slow(name: str) -> ModelSource:
        def build() -> ServedModel:
            return ServedModel(id=name, engine=SlowUnload(log, name))

        return ModelSource(name, "scripted", build, estimated_bytes=2 * GIB)

    models = registry(slow("a"), slow("b"), source("c", log, 4), memory_budget=5 * GIB)

    async def scenario() -> None:
        await use(models, "a")
        await use(models, "b")
        loading_c = asyncio.create_task(use(models, "c"))
        await asyncio.sleep(0.2)  # a is unloading; b waits its turn, marked already
        assert states(models)["b"] == "unloading"
        b_again = asyncio.create_task(models.acquire("b"))
        await asyncio.wait_for(loading_c, 10)
        (await asyncio.wait_for(b_again, 10)).release()

    asyncio.run(scenario())
    assert log[:5] == ["load a", "load b", "unload a", "unload b", "load c"]
    assert "load b" in log[5:]  # b loaded again for the request that waited


def test_an_unload_stopped_before_it_began_leaves_the_model_loaded_and_usable():
    log: list[str] = []
    models = registry(source("a", log))

    async def scenario() -> None:
        lease = await models.acquire("a")
        unloading = asyncio.create_task(models.unload("a"))
        await asyncio.sleep(0.1)
        unloading.cancel()
        await asyncio.gather(unloading, return_exceptions=True)
        lease.release()
        assert states(models) == {"a": "loaded"}
        await asyncio.wait_for(use(models, "a"), 2)

    asyncio.run(scenario())
    assert log == ["load a"]


class FailingUnload(CountedEngine):
    async def unload(self) -> None:
        raise RuntimeError("the worker would not stop")


def test_an_engine_that_fails_to_unload_stops_neither_keep_alive_nor_shutdown():
    log: list[str] = []

    def failing() -> ServedModel:
        return ServedModel(id="bad", engine=FailingUnload(log, "bad"))

    models = registry(ModelSource("bad", "scripted", failing), source("b", log), keep_alive=0)

    async def scenario() -> None:
        await models.load_all()
        await use(models, "bad")
        await use(models, "b")
        for _ in range(50):
            if states(models) == {"bad": "available", "b": "available"}:
                break
            await asyncio.sleep(0.1)
        await models.unload_all()

    asyncio.run(scenario())
    assert states(models) == {"bad": "available", "b": "available"}
    assert "unload b" in log


def test_unloading_a_model_named_at_start_makes_it_one_loaded_on_demand():
    log: list[str] = []
    models = ModelRegistry([ServedModel(id="p", engine=CountedEngine(log, "p"))])

    async def scenario() -> None:
        await models.load_all()
        await models.unload("p")
        assert models.status()[0].pinned is False and states(models) == {"p": "available"}
        await use(models, "p")
        await models.unload_all()

    asyncio.run(scenario())
    assert log == ["load p", "unload p", "load p", "unload p"]


def test_a_model_too_large_stays_available_rather_than_failed():
    models = registry(source("big", [], 9), memory_budget=8 * GIB)
    with pytest.raises(ModelTooLargeError):
        asyncio.run(models.acquire("big"))
    (status,) = models.status()
    assert status.state == "available" and "9.0 GiB" in (status.error or "")


def test_a_load_waiting_for_room_is_dropped_when_its_requests_leave():
    log: list[str] = []
    models = registry(source("a", log, 3), source("b", log, 3), memory_budget=4 * GIB)

    async def scenario() -> None:
        held = await models.acquire("a")
        waiting = asyncio.create_task(models.acquire("b"))
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(1.5)  # the load notices within a tick
        held.release()
        await asyncio.sleep(1.5)

    asyncio.run(scenario())
    assert log == ["load a"] and states(models) == {"a": "loaded", "b": "available"}


def test_a_model_named_at_start_stays_listed_once_unloaded():
    log: list[str] = []
    models = ModelRegistry(
        sources=[dataclasses.replace(source("p", log), pinned=True)], discover=lambda: []
    )

    async def scenario() -> None:
        await models.load_all()
        await models.unload("p")
        await models.refresh(force=True)
        await models.unload_all()

    asyncio.run(scenario())
    assert states(models) == {"p": "available"}
