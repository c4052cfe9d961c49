"""vLLM on CPU: the gpu_memory_utilization sized from what is free (no vLLM started)."""

from __future__ import annotations

import pytest

from vllm_obtain.contract import EngineError
from vllm_obtain.engines.vllm.cpu_memory import (
    DEFAULT_UTILIZATION,
    GIB,
    OVERHEAD,
    NodeMemory,
    cpu_memory_utilization,
)

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
    # vLLM ignores the utilization when VLLM_CPU_KVCACHE_SPACE is set.
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
