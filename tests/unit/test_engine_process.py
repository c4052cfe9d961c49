"""The engine process without a model: the wire's frames and error kinds, and the child's host
answering messages (runtime.child.EngineHost) on a scripted engine."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import signal
import threading

import pytest

from tests.scripted_engine import ScriptedEngine
from vllm_obtain.contract import (
    EngineError,
    EngineNotInstalledError,
    EngineRequestError,
    EngineUnavailableError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from vllm_obtain.runtime.child import EngineHost
from vllm_obtain.runtime.supervisor import describe_exit
from vllm_obtain.runtime.wire import (
    Chunks,
    ErrorReport,
    Failed,
    FromEngine,
    Generate,
    Ready,
    Stats,
    ToEngine,
    Tokenize,
    Tokens,
    encode_frame,
    read_frame,
)


def test_frames_round_trip_through_a_pipe_even_when_written_in_pieces():
    messages: list[ToEngine | FromEngine] = [
        Generate(7, GenerationRequest("r", (1, 2, 3), 16, SamplingParams(seed=5))),
        Chunks(((7, TokenChunk((42,), b"\xe2\x82", None)),)),  # half a UTF-8 character
        Stats({"running": 1.0}),
    ]
    data = b"".join(encode_frame(m) for m in messages)
    read_end, write_end = os.pipe()

    def write_slowly() -> None:
        for i in range(0, len(data), 3):  # the reader must reassemble short reads
            os.write(write_end, data[i : i + 3])
        os.close(write_end)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    received = [read_frame(read_end) for _ in messages]
    assert received == messages
    assert read_frame(read_end) is None  # end of stream: the server went away
    writer.join()
    os.close(read_end)


def test_exit_descriptions_name_the_signal():
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(None) == "still running"


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (EngineRequestError("no such schema", param="response_format"), EngineRequestError),
        (EngineUnavailableError("restarting", retry_after=7), EngineUnavailableError),
        (EngineNotInstalledError("pip install it"), EngineError),
        (EngineError("native failure"), EngineError),
        (ValueError("a bug"), EngineError),
    ],
)
def test_errors_keep_their_kind_across_the_wire(raised: Exception, kind: type[Exception]):
    report = pickle.loads(pickle.dumps(Failed(3, ErrorReport.of(raised)))).error
    again = report.exception()
    assert type(again) is kind
    assert str(again) == str(raised)
    if isinstance(raised, EngineRequestError):
        assert isinstance(again, EngineRequestError)
        assert again.param == "response_format"
    if isinstance(raised, EngineUnavailableError):
        assert isinstance(again, EngineUnavailableError)
        assert again.retry_after == 7


async def serve_until(
    engine: ScriptedEngine, messages: list[ToEngine], done: int
) -> tuple[EngineHost, list[FromEngine], int]:
    """Run a host on `engine`, send `messages`, wait for `done` answers (Tokens or finished
    Chunks); return the host, what it sent, and how many finished tasks are still alive."""
    sent: list[FromEngine] = []
    host = EngineHost(engine, sent.append)
    inbox: asyncio.Queue[ToEngine | None] = asyncio.Queue()
    running = asyncio.create_task(host.run(inbox))
    for message in messages:
        inbox.put_nowait(message)

    def answered() -> int:
        return sum(
            isinstance(m, Tokens)
            or (isinstance(m, Chunks) and any(c.finish_reason for _, c in m.items))
            or isinstance(m, Failed)
            for m in sent
        )

    for _ in range(500):
        if answered() >= done:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)  # let the finished tasks' callbacks run
    gc.collect()
    finished_alive = sum(isinstance(obj, asyncio.Task) and obj.done() for obj in gc.get_objects())
    inbox.put_nowait(None)
    await running
    return host, sent, finished_alive


def test_the_engine_process_forgets_every_request_once_answered():
    """It once kept every tokenize task forever: memory grew with each chat request."""
    request = GenerationRequest("g", (1, 2), 3)
    messages: list[ToEngine] = [Tokenize(sid, "hello", True) for sid in range(200)]
    messages += [Generate(1000 + sid, request) for sid in range(5)]
    host, sent, finished_alive = asyncio.run(serve_until(ScriptedEngine("abc"), messages, 205))
    assert isinstance(sent[0], Ready)
    assert sum(isinstance(m, Tokens) for m in sent) == 200
    assert host.tasks == {}
    assert finished_alive < 10  # not one per request


def test_a_refused_request_is_answered_with_its_error_kind():
    engine = ScriptedEngine(refuse=EngineRequestError("bad schema", param="response_format"))
    messages: list[ToEngine] = [Generate(1, GenerationRequest("g", (1,), 3))]
    _, sent, _ = asyncio.run(serve_until(engine, messages, 1))
    (failed,) = [m for m in sent if isinstance(m, Failed)]
    assert failed.sid == 1
    assert failed.error == ErrorReport("request", "bad schema", param="response_format")
