"""How many KV cache cells a llama.cpp model gets when the operator leaves it automatic: the one
rule, read by the engine (which allocates them) and by the memory estimate (which charges them).

One request may use the model's whole context, and the pool holds room for many requests
besides: by default `KV_TOKENS_PER_SLOT` cells per parallel slot, up to `MAX_AUTO_KV_TOKENS`,
never less than one whole context. The memory budget may lower it (weights.footprint); the
context is then what the pool holds.
"""

from __future__ import annotations

KV_TOKENS_PER_SLOT = 2048
MAX_AUTO_KV_TOKENS = 32768
MIN_KV_TOKENS = 2048  # below this a budget-squeezed pool is useless: the load is refused instead


def auto_kv_tokens(context: int, parallel: int) -> int:
    """KV cells for `parallel` slots over a model whose requests may each hold `context`."""
    return max(context, min(parallel * KV_TOKENS_PER_SLOT, MAX_AUTO_KV_TOKENS))
