"""The engine process's wire format and the supervisor's reading of exits, without a model."""

import os
import signal
import threading

from vllm_obtain.core.requests import GenerationRequest, SamplingParams, TokenChunk
from vllm_obtain.engines.supervisor import describe_exit
from vllm_obtain.engines.worker_process import encode_frame, read_frame


def test_frames_round_trip_through_a_pipe_even_when_written_in_pieces():
    messages = [
        ("generate", 7, GenerationRequest("r", (1, 2, 3), 16, SamplingParams(seed=5))),
        ("chunk", 7, TokenChunk((42,), b"\xe2\x82", None)),  # half a UTF-8 character
        ("stats", {"running": 1.0}),
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
