"""The engine supervisor without a model: its restart budget and hang rule as pure functions, then
real child processes (tests/fake_engine_process.py) that hang, stall, crash, fail to load or
refuse, each watched by a SupervisedEngine with timeouts of a second."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from tests.fake_engine_process import CRASH_EXIT_CODE, HANG_TOKEN, LOAD_ERROR, REFUSAL
from tests.scripted_engine import TEMPLATE
from vllm_obtain.contract import (
    EngineError,
    EngineRequestError,
    EngineState,
    EngineUnavailableError,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
)
from vllm_obtain.runtime.supervisor import (
    RestartBudget,
    SupervisedEmbedder,
    SupervisedEngine,
    hang_reason,
)
from vllm_obtain.runtime.wire import Start

FAKE_CHILD = [
    sys.executable,
    str(Path(__file__).resolve().parent.parent / "fake_engine_process.py"),
]
REPLY = "Hello there, world!"  # ScriptedEngine's
HANG_TIMEOUT = 1.0
DEADLINE = 15.0  # seconds a wait for a state may take on a busy machine before the test fails
SCENARIO_DEADLINE = 30.0  # a scenario the supervisor leaves waiting fails instead of hanging

# --- the restart budget ------------------------------------------------------------------------


def test_restart_delays_grow_to_thirty_seconds_then_the_budget_is_spent() -> None:
    budget = RestartBudget(7)
    assert [budget.take(float(t)) for t in range(7)] == [0, 1, 3, 7, 15, 30, 30]
    assert budget.take(7.0) is None
    assert budget.take(8.0) is None  # a refusal spends nothing
    assert budget.spent == 7


def test_restarts_older_than_the_window_no_longer_count() -> None:
    budget = RestartBudget(2, window=10.0)
    assert budget.take(0.0) == 0
    assert budget.take(1.0) == 1
    assert budget.take(10.0) is None  # the first restart is exactly one window old: it counts
    assert budget.take(10.5) == 1  # now it has left the window; one restart remains in it
    assert budget.spent == 2
    assert budget.take(11.0) is None
    assert budget.take(21.0) == 0  # both have left the window: the delays start over
    assert budget.spent == 1


def test_no_restarts_allowed_means_the_first_crash_is_final() -> None:
    budget = RestartBudget(0)
    assert budget.take(0.0) is None
    assert budget.spent == 0


# --- the hang rule -------------------------------------------------------------------------------


def test_a_silent_child_is_hung_whether_busy_or_not() -> None:
    for busy in (False, True):
        reason = hang_reason(now=100.0, last_heard=95.0, last_progress=95.0, busy=busy, timeout=4)
        assert reason == "silent for 5s"


def test_a_busy_child_without_progress_is_hung() -> None:
    reason = hang_reason(now=100.0, last_heard=99.5, last_progress=90.0, busy=True, timeout=4)
    assert reason == "made no progress for 10s"


def test_an_idle_child_that_keeps_talking_is_not_hung() -> None:
    assert hang_reason(now=100.0, last_heard=99.5, last_progress=0.0, busy=False, timeout=4) is None


def test_the_timeout_itself_is_not_yet_a_hang() -> None:
    reason = hang_reason(now=100.0, last_heard=96.0, last_progress=96.0, busy=True, timeout=4)
    assert reason is None


# --- real child processes ------------------------------------------------------------------------


def supervised(behaviour: str, *, max_restarts: int = 5) -> SupervisedEngine:
    start = Start(role="generate", engine=behaviour, model_path=Path("no-weights"))
    return SupervisedEngine(
        start, hang_timeout=HANG_TIMEOUT, max_restarts=max_restarts, command=FAKE_CHILD
    )


def run(scenario: Callable[[SupervisedEngine], Awaitable[None]], engine: SupervisedEngine) -> None:
    """Run `scenario` on `engine` (failing it if it waits too long), then unload the engine
    whatever happened: no child outlives a test."""

    async def main() -> None:
        try:
            await asyncio.wait_for(scenario(engine), SCENARIO_DEADLINE)
        finally:
            await engine.unload()

    asyncio.run(main())


def request(prompt: tuple[int, ...] = (1, 2, 3), request_id: str = "r") -> GenerationRequest:
    return GenerationRequest(request_id, prompt, max_tokens=64)


async def collect(chunks: AsyncIterator[TokenChunk]) -> list[TokenChunk]:
    return [chunk async for chunk in chunks]


async def serves_the_reply(engine: SupervisedEngine) -> None:
    chunks = await collect(engine.generate(request(request_id="after")))
    assert b"".join(c.piece for c in chunks).decode() == REPLY
    # Chunks that pile up before the reader takes them arrive merged; every token is there.
    assert sum(len(c.token_ids) for c in chunks) == len(REPLY) + 1
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


async def settled(engine: SupervisedEngine) -> EngineState:
    """The engine's state once it is no longer restarting (it may not have begun to yet)."""
    deadline = time.monotonic() + DEADLINE
    await asyncio.sleep(0)
    while engine.state == "restarting" and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return engine.state


def pid(engine: SupervisedEngine) -> int:
    return int(engine.stats()["pid"])


def gone(process_id: int) -> bool:
    """Whether the process has exited and been reaped."""
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.contextmanager
def error_logs() -> Iterator[list[str]]:
    """The messages logged at ERROR and above while the block runs (server and child alike)."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="ERROR")
    try:
        yield messages
    finally:
        logger.remove(sink)


def test_a_healthy_child_serves_and_stops_cleanly() -> None:
    engine = supervised("scripted")

    async def scenario(engine: SupervisedEngine) -> None:
        info = await engine.load()
        assert info == ModelInfo(256, 0x110000, TEMPLATE, "<s>", "</s>")
        assert engine.supported_params == frozenset({"temperature", "top_p", "seed"})
        assert engine.max_running == 4
        assert engine.state == "ready"
        assert await engine.tokenize("hi", add_special=True) == [ord("h"), ord("i")]
        await serves_the_reply(engine)
        stats = engine.stats()
        assert stats["pid"] > 0
        assert stats["restarts"] == 0

    run(scenario, engine)
    assert gone(pid(engine))


@pytest.mark.parametrize(
    ("behaviour", "reason", "not_reason"),
    [
        # The event loop is blocked: no heartbeat leaves the child.
        ("blocks-loop", "silent", "made no progress"),
        # Heartbeats keep coming, but the request gets no token.
        ("stalls", "made no progress", "silent"),
    ],
)
def test_a_hung_child_is_killed_and_restarted(behaviour: str, reason: str, not_reason: str) -> None:
    engine = supervised(behaviour)

    async def scenario(engine: SupervisedEngine) -> None:
        await engine.load()
        first = pid(engine)
        with error_logs() as errors:
            stream = engine.generate(request((HANG_TOKEN,)))
            assert (await anext(stream)).piece == b"H"
            began = time.monotonic()
            with pytest.raises(EngineUnavailableError) as caught:
                await anext(stream)
            waited = time.monotonic() - began
        assert str(caught.value) == (
            f"the {behaviour} engine stopped (killed by SIGKILL); it is restarting"
        )
        assert HANG_TIMEOUT < waited < DEADLINE  # the watchdog, not the end of a 60 s sleep
        killed = rf"{behaviour} engine process {first} {reason} for \d+s: killing it"
        assert any(re.fullmatch(killed, e) for e in errors), errors
        assert not any(not_reason in e for e in errors), errors

        assert await settled(engine) == "ready"
        assert engine.restarts == 1
        assert engine.stats()["restarts"] == 1
        assert pid(engine) != first
        assert gone(first)
        await serves_the_reply(engine)

    run(scenario, engine)


def test_an_idle_child_and_a_slow_steady_request_are_left_alone() -> None:
    engine = supervised("slow")

    async def scenario(engine: SupervisedEngine) -> None:
        await engine.load()
        first = pid(engine)
        # Idle past the timeout: progress is only owed while busy, and a request that then
        # arrives is not charged for the idle time (the watchdog looks twice while its first
        # token is on the way).
        await asyncio.sleep(1.3 * HANG_TIMEOUT)
        assert engine.state == "ready"
        began = time.monotonic()
        await serves_the_reply(engine)
        # Longer than the timeout in all, but never that long without a token.
        assert time.monotonic() - began > HANG_TIMEOUT
        assert engine.state == "ready"
        assert engine.restarts == 0
        assert pid(engine) == first

    run(scenario, engine)


def test_a_long_prefill_that_reports_progress_is_left_alone() -> None:
    engine = supervised("prefills")

    async def scenario(engine: SupervisedEngine) -> None:
        await engine.load()
        first = pid(engine)
        began = time.monotonic()
        with error_logs() as errors:
            await serves_the_reply(engine)
        # No token for 3.5 timeouts, but the engine's counter kept moving.
        assert time.monotonic() - began > 3 * HANG_TIMEOUT
        assert errors == []
        assert (engine.restarts, pid(engine)) == (0, first)

    run(scenario, engine)


def test_a_child_crashing_on_every_request_is_given_up_after_its_restarts() -> None:
    engine = supervised("crashes", max_restarts=2)

    async def scenario(engine: SupervisedEngine) -> None:
        await engine.load()
        crashed = (
            f"the crashes engine stopped (exited with code {CRASH_EXIT_CODE}); it is restarting"
        )
        # Restart 1 comes at once, restart 2 after a second; the third crash spends the budget.
        for restarts, state, at_least in ((1, "ready", 0.0), (2, "ready", 1.0), (2, "failed", 0.0)):
            before = pid(engine)
            began = time.monotonic()
            with pytest.raises(EngineUnavailableError) as caught:
                await collect(engine.generate(request()))
            assert str(caught.value) == crashed
            assert await settled(engine) == state
            assert time.monotonic() - began >= at_least
            assert engine.restarts == restarts
            assert gone(before)
            if state == "ready":
                assert pid(engine) != before

        with pytest.raises(EngineUnavailableError) as caught:
            await collect(engine.generate(request()))
        assert str(caught.value) == "the crashes engine is failed; retry shortly"
        assert caught.value.retry_after == int(HANG_TIMEOUT)
        with pytest.raises(EngineUnavailableError):
            await engine.tokenize("hi", add_special=True)

    run(scenario, engine)


def test_a_model_that_cannot_load_fails_load_with_its_error() -> None:
    engine = supervised("fails-to-load")

    async def scenario(engine: SupervisedEngine) -> None:
        with error_logs() as errors, pytest.raises(EngineError) as caught:
            await engine.load()
        assert type(caught.value) is EngineError
        assert str(caught.value) == (
            f"the fails-to-load engine could not load the model: RuntimeError: {LOAD_ERROR}"
        )
        # The child's own log line crossed the wire before it gave up.
        assert errors == [f"the fails-to-load engine failed to load (RuntimeError({LOAD_ERROR!r}))"]
        assert engine.state == "loading"
        assert engine.restarts == 0
        assert gone(pid(engine))

    run(scenario, engine)


def test_a_refusal_crosses_the_wire_as_a_request_error_naming_its_param() -> None:
    engine = supervised("refuses")

    async def scenario(engine: SupervisedEngine) -> None:
        await engine.load()
        first = pid(engine)
        for _ in range(2):  # and the engine serves on: a refusal is no crash
            with pytest.raises(EngineRequestError) as caught:
                await collect(engine.generate(request()))
            assert str(caught.value) == str(REFUSAL)
            assert caught.value.param == "response_format"
        assert engine.state == "ready"
        assert engine.restarts == 0
        assert pid(engine) == first

    run(scenario, engine)


def test_unloading_while_a_restart_waits_starts_no_new_child() -> None:
    """It once started the child anyway after the wait, and left it running."""
    engine = supervised("crashes", max_restarts=3)

    async def scenario(engine: SupervisedEngine) -> None:
        await engine.load()
        for _ in range(2):  # restart 1 (at once), then restart 2 begins its one-second wait
            with pytest.raises(EngineUnavailableError):
                await collect(engine.generate(request()))
            if engine.restarts == 1:
                assert await settled(engine) == "ready"
        assert (engine.state, engine.restarts) == ("restarting", 2)
        last = pid(engine)
        began = time.monotonic()
        await engine.unload()
        assert time.monotonic() - began < 0.5  # not after the wait, not after a new load
        await asyncio.sleep(1.5)  # past the wait: nothing starts
        assert pid(engine) == last and gone(last)
        assert engine.state == "restarting"

    run(scenario, engine)


def embedder() -> SupervisedEmbedder:
    start = Start("embed", "embedder", Path("weights"))
    return SupervisedEmbedder(start, hang_timeout=HANG_TIMEOUT, command=FAKE_CHILD)


def test_a_tokenize_call_that_never_returns_is_a_hang() -> None:
    """It once waited forever: only generation streams were watched."""
    engine = embedder()

    async def scenario() -> None:
        try:
            await engine.load()
            began = time.monotonic()
            with pytest.raises(EngineUnavailableError) as caught:
                await asyncio.wait_for(engine.tokenize("stuck"), DEADLINE)
            assert HANG_TIMEOUT < time.monotonic() - began < DEADLINE
            assert "embeddings engine stopped (killed by SIGKILL)" in str(caught.value)
            deadline = time.monotonic() + DEADLINE
            while engine.state != "ready" and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert (engine.state, engine.restarts) == ("ready", 1)
            assert await engine.tokenize("fine") == [1]
        finally:
            await engine.unload()

    asyncio.run(scenario())


def test_a_long_embedding_batch_is_work_not_a_hang() -> None:
    engine = embedder()

    async def scenario() -> None:
        try:
            await engine.load()
            began = time.monotonic()
            vectors = await asyncio.wait_for(engine.embed([[1], [2]]), DEADLINE)
            assert time.monotonic() - began > 2 * HANG_TIMEOUT
            assert vectors == [[1.0, 0.0, 0.0, 0.0]] * 2
            assert (engine.state, engine.restarts) == ("ready", 0)
        finally:
            await engine.unload()

    asyncio.run(scenario())


# --- an engine process never outlives its parent ------------------------------------------------

# A server that starts a wedged engine (its event loop blocked: it cannot read the pipe
# closing) and prints the engine's pid, then waits to be killed.
WEDGED_PARENT = f"""
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.fake_engine_process import HANG_TOKEN
from vllm_obtain.contract import GenerationRequest
from vllm_obtain.runtime.supervisor import SupervisedEngine
from vllm_obtain.runtime.wire import Start

async def main():
    start = Start(role="generate", engine="blocks-loop", model_path=Path("no-weights"))
    engine = SupervisedEngine(start, hang_timeout=600, command={FAKE_CHILD!r})
    await engine.load()
    stream = engine.generate(GenerationRequest("r", (HANG_TOKEN,), 8))
    await anext(stream)
    print(engine.stats()["pid"], flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_an_engine_process_dies_with_its_parent_even_when_wedged():
    import subprocess

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", WEDGED_PARENT], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        engine_pid = int(parent.stdout.readline())
        engine = psutil.Process(engine_pid)
        time.sleep(0.5)
        assert engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE
        parent.kill()  # as Ray kills a replica's actor: no chance to stop the engine in order
        parent.wait()
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                if engine.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        else:
            engine.kill()
            pytest.fail("the engine process outlived its parent")
    finally:
        parent.kill()
