"""vLLM on CPU: the KV cache size it is given, and the gpu_memory_utilization sized from what is
free when it sizes its KV cache itself (no vLLM started)."""

from __future__ import annotations

import pytest

from vllm_obtain.contract import EngineConfig, EngineError
from vllm_obtain.engines.vllm.cpu_memory import (
    DEFAULT_UTILIZATION,
    GIB,
    OVERHEAD,
    UNSIZED_KV_CACHE,
    NodeMemory,
    cpu_kv_cache_arguments,
    cpu_memory_utilization,
)
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import engine_config

WEIGHTS = GIB // 4  # the embedded 135M model, in bf16


def node(total_gib: float, free_gib: float) -> NodeMemory:
    return NodeMemory(0, int(total_gib * GIB), int(free_gib * GIB))


def test_vllms_default_when_it_fits_what_is_free() -> None:
    memory = node(64, 63)  # 0.92 of it, 58.9 GiB, is still free once vLLM's processes run
    assert (
        cpu_memory_utilization(memory, weights=WEIGHTS, kv_cache=None, user_utilization=False)
        is None
    )


def test_a_small_idle_node_is_too_small_for_vllms_default() -> None:
    # 0.92 of 9.34 GiB leaves 0.75 GiB for vLLM's own engine core and worker: too little.
    memory = node(9.34, 9.3)
    size = cpu_memory_utilization(memory, weights=WEIGHTS, kv_cache=None, user_utilization=False)
    assert size is not None and size * memory.total <= memory.free - OVERHEAD


def test_a_busy_node_gets_what_is_free_less_the_overhead() -> None:
    # The node: 7.8 of 9.34 GiB free, where vLLM's 0.92 asks for 8.6 GiB.
    memory = node(9.34, 7.8)
    size = cpu_memory_utilization(memory, weights=WEIGHTS, kv_cache=None, user_utilization=False)
    assert size is not None and 0 < size < DEFAULT_UTILIZATION
    asked = size * memory.total
    assert asked <= memory.free - OVERHEAD  # still free once vLLM's other processes run
    assert asked > memory.free - OVERHEAD - 0.01 * GIB  # and no less than that


def test_an_explicit_kv_cache_that_fits_leaves_the_utilization_alone() -> None:
    # vLLM ignores the utilization when kv_cache_memory_bytes is set.
    size = cpu_memory_utilization(
        node(9.34, 4), weights=WEIGHTS, kv_cache=GIB, user_utilization=False
    )
    assert size is None


def test_the_users_utilization_is_never_overridden() -> None:
    size = cpu_memory_utilization(
        node(9.34, 3), weights=WEIGHTS, kv_cache=None, user_utilization=True
    )
    assert size is None


def test_a_kv_cache_larger_than_what_is_free_is_refused_saying_how_much() -> None:
    with pytest.raises(EngineError) as refused:
        cpu_memory_utilization(
            node(9.34, 5.5), weights=WEIGHTS, kv_cache=4 * GIB, user_utilization=False
        )
    message = str(refused.value)
    assert "needs about 6.2 GiB" in message  # 0.25 weights + 4 KV cache + 2 vLLM's processes
    assert "only 5.5 of 9.3 GiB is free" in message
    assert "NUMA node 0" in message
    assert "lower --kv-cache-gib" in message


def test_the_users_utilization_does_not_hide_a_kv_cache_that_cannot_fit() -> None:
    with pytest.raises(EngineError, match="lower --kv-cache-gib"):
        cpu_memory_utilization(node(9.34, 2), weights=WEIGHTS, kv_cache=GIB, user_utilization=True)


def test_a_node_too_full_for_any_kv_cache_is_refused() -> None:
    with pytest.raises(EngineError) as refused:
        cpu_memory_utilization(
            node(9.34, 3), weights=WEIGHTS, kv_cache=None, user_utilization=False
        )
    message = str(refused.value)
    assert "needs about 3.2 GiB" in message and "only 3.0 of 9.3 GiB is free" in message
    assert "free memory on this machine" in message


def test_vllm_fits_its_context_to_the_kv_cache_unless_one_is_asked_for(tmp_path) -> None:
    from vllm_obtain.engines.vllm.engine import engine_arguments

    # -1 is vLLM's auto-fit: the model's own context, or the longest its KV cache holds.
    assert engine_arguments(tmp_path, {}, 0)["max_model_len"] == -1
    assert engine_arguments(tmp_path, {}, 4096)["max_model_len"] == 4096
    assert engine_arguments(tmp_path, {"max_model_len": 2048}, 4096)["max_model_len"] == 2048


def test_vllm_on_cpu_is_given_its_kv_cache_in_bytes_exactly() -> None:
    # kv_cache_memory_bytes, not VLLM_CPU_KVCACHE_SPACE: that one takes whole GiB only.
    sized = 757_923_840 / GIB  # SmolLM2-135M's 32768 tokens and the null block
    args = cpu_kv_cache_arguments({"model": "m"}, sized)
    assert args == {"model": "m", "kv_cache_memory_bytes": 757_923_840}
    assert cpu_kv_cache_arguments({}, 2.0)["kv_cache_memory_bytes"] == 2 * GIB


def test_free_leaves_vllm_to_size_its_kv_cache_from_what_is_free() -> None:
    assert cpu_kv_cache_arguments({"model": "m"}, "free") == {"model": "m"}


def test_an_engine_made_without_a_size_still_never_takes_all_that_is_free() -> None:
    assert cpu_kv_cache_arguments({}, None) == {"kv_cache_memory_bytes": UNSIZED_KV_CACHE}


def test_the_operators_own_vllm_argument_wins() -> None:
    args = {"kv_cache_memory_bytes": 3 * GIB}
    assert cpu_kv_cache_arguments(args, 1.0) == args


@pytest.mark.parametrize(
    ("given", "read"), [(None, None), ("2", 2.0), ("0.5", 0.5), ("free", "free")]
)
def test_kv_cache_gib_takes_a_size_or_free(given: str | None, read: float | str | None) -> None:
    settings = Settings(kv_cache_gib=given)
    assert settings.kv_cache_gib == read
    assert engine_config(settings).cpu_kv_cache_gib == read


@pytest.mark.parametrize("given", ["0", "-1", "all", "FREE"])
def test_kv_cache_gib_refuses_what_is_neither(given: str) -> None:
    with pytest.raises(ValueError, match="kv_cache_gib"):
        Settings(kv_cache_gib=given)


def test_the_engine_config_default_is_sized_from_the_model() -> None:
    assert EngineConfig().cpu_kv_cache_gib is None
