"""The Ray Serve pieces without a cluster: prefix routing, the remote engine's retries on a
scripted handle, the replica board, and what each flag becomes in the deployments' options
(tensor and pipeline parallel included, which no machine here can run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve not installed: ./install.sh --ray")

from ray.exceptions import ActorDiedError, RayTaskError

from vllm_obtain.cluster import board as board_module
from vllm_obtain.cluster.application import (
    cluster_models,
    deployment_name,
    engine_options,
    for_replicas,
)
from vllm_obtain.cluster.board import ReplicaBoard
from vllm_obtain.cluster.messages import (
    ClusterModel,
    ReplicaDescription,
    ReplicaFault,
)
from vllm_obtain.cluster.prefix_index import BLOCK_TOKENS, PrefixIndex
from vllm_obtain.cluster.remote_engine import RemoteEngine
from vllm_obtain.cluster.replica import parallel_size, sharded_over_ray
from vllm_obtain.cluster.router import MIN_CACHED_TOKENS, PrefixAwareRouter
from vllm_obtain.contract import (
    EngineError,
    EngineRequestError,
    EngineUnavailableError,
    GenerationRequest,
    ModelInfo,
    ReplicaReport,
    TokenChunk,
)
from vllm_obtain.core.generation import GenerationTimeoutError
from vllm_obtain.core.served_model import QueueFullError
from vllm_obtain.hardware import PlatformInfo
from vllm_obtain.runtime.wire import ErrorReport
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import engine_config

INFO = ModelInfo(context_length=512, vocab_size=100, chat_template=None, bos_token="", eos_token="")


def tokens(count: int, start: int = 0) -> tuple[int, ...]:
    return tuple(range(start, start + count))


# --- the prefix index ----------------------------------------------------------------------


def test_a_prompt_is_remembered_by_its_whole_blocks_only():
    index = PrefixIndex()
    index.record("a", tokens(BLOCK_TOKENS * 2 + 5))
    assert len(index) == 2
    assert index.longest_match(tokens(BLOCK_TOKENS * 3), {"a"}) == ({"a"}, BLOCK_TOKENS * 2)
    assert index.longest_match(tokens(BLOCK_TOKENS - 1), {"a"}) == (set(), 0)


def test_the_replicas_holding_the_longest_shared_prefix_are_found_among_the_live_ones():
    index = PrefixIndex()
    shared = tokens(BLOCK_TOKENS * 2)
    index.record("a", shared + tokens(BLOCK_TOKENS * 2, start=1000))
    index.record("b", shared + tokens(BLOCK_TOKENS, start=2000))
    question = shared + tokens(BLOCK_TOKENS * 2, start=1000)
    assert index.longest_match(question, {"a", "b"}) == ({"a"}, BLOCK_TOKENS * 4)
    # "a" has gone: "b" still holds the shared part.
    assert index.longest_match(question, {"b"}) == ({"b"}, BLOCK_TOKENS * 2)
    # A different first block shares nothing, whatever follows.
    assert index.longest_match(tokens(BLOCK_TOKENS, start=9) + question, {"a", "b"}) == (set(), 0)


def test_the_least_recently_used_prefixes_are_forgotten_past_the_bound():
    index = PrefixIndex(max_keys=4)
    index.record("a", tokens(BLOCK_TOKENS * 2))
    index.record("b", tokens(BLOCK_TOKENS * 2, start=500))
    index.record("a", tokens(BLOCK_TOKENS * 2))  # used again: now the most recent
    index.record("c", tokens(BLOCK_TOKENS * 2, start=900))
    assert len(index) == 4
    assert index.longest_match(tokens(BLOCK_TOKENS * 2), {"a"})[1] == BLOCK_TOKENS * 2
    assert index.longest_match(tokens(BLOCK_TOKENS * 2, start=500), {"b"}) == (set(), 0)


def test_a_replica_that_has_gone_holds_nothing():
    index = PrefixIndex()
    index.record("a", tokens(BLOCK_TOKENS * 2))
    index.forget("a")
    assert len(index) == 0


# --- routing ---------------------------------------------------------------------------------


def replica(name: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), name=name)


def pending(prompt: tuple[int, ...] | None, avoid: tuple[str, ...] = ()) -> Any:
    args = [] if prompt is None else [GenerationRequest("r", prompt, 8)]
    return SimpleNamespace(
        args=args, kwargs={"avoid": avoid}, routing_context=SimpleNamespace(should_backoff=False)
    )


def router() -> PrefixAwareRouter:
    made = PrefixAwareRouter.__new__(PrefixAwareRouter)  # no Serve machinery: the policy only
    made.initialize_state()
    return made


def names(ranks: list[list[Any]]) -> list[list[str]]:
    return [[r.name for r in rank] for rank in ranks]


def test_a_request_goes_first_to_the_replica_holding_its_prefix_then_to_the_others():
    policy = router()
    a, b, c = replica("a"), replica("b"), replica("c")
    prompt = tokens(MIN_CACHED_TOKENS + BLOCK_TOKENS)
    assert names(policy.rank([a, b, c], pending(prompt))) == [["a", "b", "c"]]
    policy.on_request_routed(pending(prompt), a.replica_id, None)
    request = pending(prompt + tokens(5, start=7000))
    assert names(policy.rank([a, b, c], request)) == [["a"], ["b", "c"]]
    # Serve tries "a", then the least loaded of the rest; once all are full it backs off.
    assert request.routing_context.should_backoff


def test_a_short_shared_prefix_is_not_worth_a_busier_replica():
    policy = router()
    a, b = replica("a"), replica("b")
    short = tokens(MIN_CACHED_TOKENS - BLOCK_TOKENS)
    policy.on_request_routed(pending(short), a.replica_id, None)
    assert names(policy.rank([a, b], pending(short + tokens(40, start=99)))) == [["a", "b"]]


def test_a_retried_request_avoids_the_replicas_it_failed_on():
    policy = router()
    a, b = replica("a"), replica("b")
    prompt = tokens(MIN_CACHED_TOKENS * 2)
    policy.on_request_routed(pending(prompt), a.replica_id, None)
    assert names(policy.rank([a, b], pending(prompt, avoid=("a",)))) == [["b"]]
    # Nothing else left: the one it failed on is better than none.
    assert names(policy.rank([a], pending(prompt, avoid=("a",)))) == [["a"]]


def test_calls_without_a_prompt_go_to_the_least_loaded_replica():
    policy = router()
    a, b = replica("a"), replica("b")
    assert names(policy.rank([a, b], pending(None))) == [["a", "b"]]
    assert names(policy.rank([a, b], None)) == [["a", "b"]]


def test_a_routing_failure_falls_back_to_every_replica(monkeypatch):
    policy = router()

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(policy, "rank", broken)
    a, b = replica("a"), replica("b")
    ranks = asyncio.run(policy.choose_replicas([a, b], pending(tokens(10))))
    assert names(ranks) == [["a", "b"]]
    broken_request: Any = SimpleNamespace(args=None)
    policy.on_request_routed(broken_request, a.replica_id, None)  # logged, not raised


# --- the remote engine -----------------------------------------------------------------------


class ScriptedStream:
    """What a streaming DeploymentHandle call gives: the items (an exception is raised when
    reached), and whether it was cancelled."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        for item in self.items:
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedMethod:
    def __init__(self, answers: list[Any], *, stream: bool) -> None:
        self.answers, self.stream = answers, stream
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.made: list[ScriptedStream] = []

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        answer = self.answers.pop(0)
        if self.stream:
            self.made.append(ScriptedStream(answer))
            return self.made[-1]

        async def reply() -> Any:
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return reply()


class ScriptedHandle:
    """A DeploymentHandle whose calls answer from scripts, one answer per call."""

    describe: ScriptedMethod
    tokenize: ScriptedMethod

    def __init__(self, *, generate: list[list[Any]] | None = None, **unary: list[Any]) -> None:
        self.generate = ScriptedMethod(list(generate or []), stream=True)
        for name, answers in unary.items():
            setattr(self, name, ScriptedMethod(list(answers), stream=False))

    def options(self, *, stream: bool) -> Any:
        return SimpleNamespace(generate=self.generate)


def chunk(text: str, finish: Any = None) -> TokenChunk:
    return TokenChunk((1,), text.encode(), finish)


def unavailable(replica_id: str) -> ReplicaFault:
    return ReplicaFault(ErrorReport("unavailable", "the engine is restarting"), replica_id)


async def collect(engine: RemoteEngine, request: GenerationRequest) -> str:
    return "".join([c.piece.decode() async for c in engine.generate(request)])


REQUEST = GenerationRequest("r", (1, 2, 3), 8)


def remote(handle: ScriptedHandle) -> RemoteEngine:
    return RemoteEngine("m", "llama.cpp", handle, board=None, deployment="engine-m")


def test_a_request_whose_replica_is_lost_before_any_token_is_retried_elsewhere():
    handle = ScriptedHandle(generate=[[ActorDiedError()], [chunk("ok"), chunk("!", "stop")]])
    assert asyncio.run(collect(remote(handle), REQUEST)) == "ok!"
    assert len(handle.generate.calls) == 2


def test_an_engine_down_in_one_replica_is_retried_on_another():
    handle = ScriptedHandle(generate=[[unavailable("r1")], [chunk("ok", "stop")]])
    assert asyncio.run(collect(remote(handle), REQUEST)) == "ok"
    assert handle.generate.calls[1][1] == {"avoid": ("r1",)}


def test_a_stream_cut_after_its_first_token_ends_with_an_unavailable_error():
    handle = ScriptedHandle(generate=[[chunk("par"), ActorDiedError()]])
    with pytest.raises(EngineUnavailableError, match="was lost"):
        asyncio.run(collect(remote(handle), REQUEST))
    assert len(handle.generate.calls) == 1


def test_a_request_is_tried_on_two_replicas_at_most():
    """A prompt that crashes engines must not take down every replica in turn."""
    handle = ScriptedHandle(generate=[[ActorDiedError()] for _ in range(2)])
    with pytest.raises(EngineUnavailableError):
        asyncio.run(collect(remote(handle), REQUEST))
    assert len(handle.generate.calls) == 2


def test_an_exception_in_the_replicas_own_code_is_a_failure_not_a_lost_replica():
    crashed = RayTaskError("generate", "Traceback...", ValueError("a bug"))
    handle = ScriptedHandle(generate=[[crashed]], tokenize=[crashed])
    with pytest.raises(EngineError) as raised:
        asyncio.run(collect(remote(handle), REQUEST))
    assert not isinstance(raised.value, EngineUnavailableError)  # a 500, not "retry later"
    assert len(handle.generate.calls) == 1
    with pytest.raises(EngineError):
        asyncio.run(remote(handle).tokenize("hi", add_special=False))


def test_a_request_an_engine_refuses_is_refused_once_not_retried():
    refused = ReplicaFault(ErrorReport("request", "bad schema", param="response_format"), "r1")
    handle = ScriptedHandle(generate=[[refused]])
    with pytest.raises(EngineRequestError) as raised:
        asyncio.run(collect(remote(handle), REQUEST))
    assert raised.value.param == "response_format"
    assert len(handle.generate.calls) == 1


def test_past_the_replicas_batches_and_the_queue_a_new_request_is_refused():
    """Tokenizing waits for a replica's place like generating: the bound holds there."""
    handle = ScriptedHandle(tokenize=[[1], [2]])
    engine = RemoteEngine("m", "llama.cpp", handle, None, "engine-m", max_queue=1)
    engine.max_running = 2

    async def three_in_hand() -> None:
        streams = [engine.generate(REQUEST) for _ in range(3)]
        handle.generate.answers = [[chunk("x")] for _ in streams]
        for stream in streams:
            await anext(stream)  # each holds its place until closed
        with pytest.raises(QueueFullError):
            await engine.tokenize("hi", add_special=False)
        await streams[0].aclose()
        assert await engine.tokenize("hi", add_special=False) == [1]
        for stream in streams[1:]:
            await stream.aclose()

    asyncio.run(three_in_hand())


def test_a_request_waiting_too_long_for_a_replica_to_tokenize_it_times_out():
    never: asyncio.Future[Any] | None = None

    class Waits:
        def remote(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal never
            never = asyncio.get_running_loop().create_future()
            return never

    handle = ScriptedHandle()
    handle.tokenize = Waits()  # type: ignore[assignment]
    engine = RemoteEngine("m", "llama.cpp", handle, None, "engine-m", timeout=0.2)
    with pytest.raises(GenerationTimeoutError):
        asyncio.run(engine.tokenize("hi", add_special=False))
    assert never is not None and never.cancelled()


def test_a_client_leaving_cancels_the_request_on_its_replica():
    handle = ScriptedHandle(generate=[[chunk("a"), chunk("b"), chunk("c", "stop")]])

    async def first_only() -> None:
        stream = remote(handle).generate(REQUEST)
        await anext(stream)
        await stream.aclose()

    asyncio.run(first_only())
    assert handle.generate.made[0].cancelled


def test_a_cancelled_request_cancels_the_request_on_its_replica():
    handle = ScriptedHandle(generate=[[chunk("a")] + [chunk("b")] * 1000])

    async def cancel_midway() -> None:
        async def consume() -> None:
            async with contextlib.aclosing(remote(handle).generate(REQUEST)) as stream:
                async for _ in stream:
                    await asyncio.sleep(0.001)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert handle.generate.made[0].cancelled


def test_a_finished_stream_is_not_cancelled():
    handle = ScriptedHandle(generate=[[chunk("a", "stop")]])
    asyncio.run(collect(remote(handle), REQUEST))
    assert not handle.generate.made[0].cancelled


def test_tokenizing_is_retried_while_a_replica_is_lost():
    handle = ScriptedHandle(tokenize=[ActorDiedError(), [5, 6]])
    assert asyncio.run(remote(handle).tokenize("hi", add_special=False)) == [5, 6]
    assert handle.tokenize.calls[1][0] == ("hi", False)


def test_loading_takes_what_the_replicas_serve():
    description = ReplicaDescription(INFO, frozenset({"temperature", "seed"}), 4)
    handle = ScriptedHandle(describe=[description])
    engine = remote(handle)

    async def load() -> ModelInfo:
        info = await engine.load()
        await engine.unload()
        return info

    assert asyncio.run(load()) == INFO
    assert engine.supported_params == {"temperature", "seed"}
    assert engine.max_running == 4


def test_the_replicas_reports_make_the_deployments_state_gauges_and_capacity():
    engine = remote(ScriptedHandle())
    engine._per_replica = 4
    engine.take_reports(
        [
            ReplicaReport("b", "n2", "restarting", {"running": 0, "requests": 1, "restarts": 1}),
            ReplicaReport("a", "n1", "ready", {"running": 3, "kv_cache_usage": 0.5, "requests": 7}),
        ]
    )
    assert [r.replica_id for r in engine.replicas()] == ["a", "b"]
    assert engine.state == "ready"
    assert engine.max_running == 4  # one replica ready
    stats = engine.stats()
    assert stats["running"] == 3 and stats["requests"] == 8 and stats["ready_replicas"] == 1
    assert stats["kv_cache_usage"] == 0.5
    engine.take_reports([ReplicaReport("b", "n2", "unreachable", {})])
    assert engine.state == "restarting"


# --- the replica board -----------------------------------------------------------------------


def test_a_silent_replica_is_shown_unreachable_then_forgotten(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(board_module.time, "monotonic", lambda: now[0])
    board = ReplicaBoard()
    board.report("engine-m", ReplicaReport("a", "n1", "ready"))
    board.report("engine-other", ReplicaReport("z", "n1", "ready"))
    assert [(r.replica_id, r.state) for r in board.reports("engine-m")] == [("a", "ready")]
    now[0] += board_module.UNREACHABLE_SECONDS + 1
    assert [r.state for r in board.reports("engine-m")] == ["unreachable"]
    now[0] += board_module.DROP_SECONDS
    assert board.reports("engine-m") == []
    board.report("engine-m", ReplicaReport("b", "n1", "ready"))
    board.forget("b")
    assert board.reports("engine-m") == []


# --- deployment options ----------------------------------------------------------------------

MODEL = ClusterModel("m", "m", "llama.cpp", "engine-m")


def resources(options: dict[str, Any]) -> tuple[float, float]:
    """The CPUs and GPUs a replica reserves."""
    actor = options["ray_actor_options"]
    return actor["num_cpus"], actor["num_gpus"]


def test_every_deployment_runs_its_code_on_serves_own_event_loop():
    from vllm_obtain.cluster.application import ingress_options

    for options in (engine_options(Settings(), MODEL, cluster_gpus=0), ingress_options(Settings())):
        env = options["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_the_ingress_stays_on_the_head_node_beside_serves_proxy():
    from vllm_obtain.cluster.application import ingress_options

    actor = ingress_options(Settings())["ray_actor_options"]
    assert actor["num_cpus"] == 0
    assert "node:__internal_head__" in actor["resources"]


VLLM = ClusterModel("big", "org/big", "vllm", "engine-big")


def test_replicas_reserve_their_threads_and_take_as_many_requests_as_they_batch():
    options = engine_options(Settings(replicas=2, threads=1, parallel=4), MODEL, cluster_gpus=0)
    assert options["num_replicas"] == 2
    assert resources(options) == (1.0, 0.0)
    assert options["max_ongoing_requests"] == 4
    assert options["max_queued_requests"] == -1  # the ingress bounds the queue
    router_path = options["request_router_config"]["request_router_class"]
    assert router_path == f"{PrefixAwareRouter.__module__}.{PrefixAwareRouter.__name__}"
    mlx = engine_options(Settings(max_batch=8), ClusterModel("x", "x", "mlx", "e"), cluster_gpus=0)
    assert mlx["max_ongoing_requests"] == 8


def test_autoscaling_keeps_between_min_and_max_replicas_scaled_on_half_a_batch():
    options = engine_options(Settings(autoscale="1:4", parallel=16), MODEL, cluster_gpus=0)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
    }


def test_vllm_replicas_take_a_gpu_when_the_cluster_has_them():
    assert resources(engine_options(Settings(), VLLM, cluster_gpus=8)) == (1.0, 1.0)
    assert resources(engine_options(Settings(), VLLM, cluster_gpus=0)) == (1.0, 0.0)
    given = engine_options(Settings(replica_gpus=0.5, replica_cpus=4), VLLM, cluster_gpus=8)
    assert resources(given) == (4.0, 0.5)
    assert engine_options(Settings(), VLLM, cluster_gpus=8)["max_ongoing_requests"] == 256


def test_a_sharded_model_gets_a_placement_group_of_one_gpu_per_worker():
    settings = Settings(tensor_parallel=2, pipeline_parallel=2, replica_cpus=2)
    options = engine_options(settings, VLLM, cluster_gpus=4)
    assert resources(options) == (2.0, 0)
    assert options["placement_group_bundles"] == [
        {"CPU": 2.0, "GPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
    ]
    assert options["placement_group_strategy"] == "PACK"


def test_a_sharded_model_runs_vllms_ray_executor_in_the_replicas_placement_group():
    settings = Settings(tensor_parallel=2, pipeline_parallel=2)
    config = engine_config(settings)
    assert parallel_size(config) == 4
    sharded = sharded_over_ray(config, address="10.0.0.1:6379", placement_group="ab12")
    assert sharded.vllm_args == {
        "distributed_executor_backend": "ray",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 2,
    }
    assert (sharded.ray_address, sharded.ray_placement_group) == ("10.0.0.1:6379", "ab12")
    # --vllm-arg names vLLM's arguments exactly: it wins over the flags.
    given = engine_config(Settings(tensor_parallel=2, vllm_args={"tensor_parallel_size": 8}))
    assert parallel_size(given) == 8


def test_vllm_is_given_the_parallelism_and_ray_executor_as_engine_arguments(tmp_path: Path):
    pytest.importorskip("vllm", reason="vLLM not installed: ./install.sh --engines vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_obtain.engines.vllm.engine import engine_arguments

    config = sharded_over_ray(
        engine_config(Settings(tensor_parallel=2, pipeline_parallel=3)),
        address="10.0.0.1:6379",
        placement_group="ab12",
    )
    args = AsyncEngineArgs(**engine_arguments(tmp_path, config.vllm_args, 4096))
    assert args.tensor_parallel_size == 2
    assert args.pipeline_parallel_size == 3
    assert args.distributed_executor_backend == "ray"
    assert args.max_model_len == 4096


def test_deployment_names_keep_only_what_serve_allows():
    assert deployment_name("org/name:Q4_K_M") == "engine-org-name-Q4_K_M"


def test_replicas_read_the_directories_as_absolute_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = for_replicas(Settings(models_dir=Path("models"), logs_dir=Path("logs")))
    assert shipped.models_dir == tmp_path / "models"
    assert shipped.logs_dir.is_absolute() and shipped.cache_dir.is_absolute()


def test_the_default_model_is_served_under_its_alias_on_the_engine_chosen_here():
    info = PlatformInfo("Linux", "x86_64", 2, installed_engines=("llama.cpp",))
    (model,) = cluster_models(Settings(), info)
    assert (model.id, model.engine, model.deployment) == (
        "smollm2-135m-instruct",
        "llama.cpp",
        "engine-smollm2-135m-instruct",
    )
    renamed = cluster_models(Settings(served_model_name="chat"), info)
    assert renamed[0].id == "chat"


# --- taking the application down --------------------------------------------------------------


def test_taking_down_gives_up_on_an_application_that_does_not_go_and_still_stops_ray(monkeypatch):
    """Ray's own processes may have had the signal too (a terminal's Ctrl-C, systemd's default
    KillMode): deleting the application then never returns, and must not hold the exit."""
    import threading
    import time

    import ray
    from ray import serve

    from vllm_obtain.cluster.launcher import take_down

    release = threading.Event()
    stopped: list[str] = []
    monkeypatch.setattr(serve, "delete", lambda name: release.wait(30))
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append("ray"))
    started = time.monotonic()
    take_down(True, within=0.5)
    assert time.monotonic() - started < 5
    assert stopped == ["ray"]
    release.set()
    stopped.clear()
    take_down(False, within=0.5)  # joined a cluster: Ray is not ours to stop
    assert stopped == []


# --- HAProxy within the open-files limit ------------------------------------------------------


def test_haproxy_is_asked_for_no_more_connections_than_the_open_files_limit_holds():
    from vllm_obtain.cluster.launcher import (
        HAPROXY_FDS_PER_CONNECTION,
        SERVE_HAPROXY_MAXCONN,
        haproxy_connection_limit,
    )

    assert haproxy_connection_limit(1_048_576) == SERVE_HAPROXY_MAXCONN
    fitted = haproxy_connection_limit(4096)  # the CI runner's limit, where HAProxy would not start
    assert 1000 < fitted < SERVE_HAPROXY_MAXCONN
    assert fitted * HAPROXY_FDS_PER_CONNECTION + 100 < 4096
    assert haproxy_connection_limit(100) > 0


def test_the_open_files_limit_is_raised_to_the_hard_limit_before_haproxy_is_fitted(monkeypatch):
    import resource

    from vllm_obtain.cluster import launcher

    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda kind: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda kind, pair: limits.update(now=pair))
    monkeypatch.delenv("RAY_SERVE_HAPROXY_MAXCONN", raising=False)
    launcher.fit_haproxy_to_open_files()
    assert limits["now"] == (4096, 4096)
    assert os.environ["RAY_SERVE_HAPROXY_MAXCONN"] == str(launcher.haproxy_connection_limit(4096))

    monkeypatch.setenv("RAY_SERVE_HAPROXY_MAXCONN", "200")  # the user's own figure stays
    launcher.fit_haproxy_to_open_files()
    assert os.environ["RAY_SERVE_HAPROXY_MAXCONN"] == "200"
