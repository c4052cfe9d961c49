"""The plain data that crosses the engine boundary: requests in, token chunks out, and what a
loaded model reports. Frozen dataclasses of builtins, so they cross a thread or a process
(pickled) unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]
# What an engine reads: GGUF files (llama.cpp's own format), or Hugging Face-format directories.
WeightFormat = Literal["gguf", "hf"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is picked; OpenAI's defaults (temperature 1, top_p 1, no penalties)."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # Keep generating past end-of-sequence: fixed-length output for benchmarks (as vLLM's and
    # llama.cpp's own servers offer).
    ignore_eos: bool = False
    # (token id, bias) pairs added to the logits before sampling, as OpenAI's logit_bias.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class JsonOutput:
    """Constrain the output to JSON: any JSON object, or a value valid against `schema` (a JSON
    Schema, as JSON text so that it crosses a process and keys a grammar cache as is)."""

    schema: str | None = None
    param: str = "response_format"  # the request field it came from, for errors


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: the prompt already tokenized, a hard cap on new tokens."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    json_output: JsonOutput | None = None
    # Report each generated token's log-probability and this many most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives
    at its place (bytes, as a token may hold part of a UTF-8 character)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """What an engine emits per step: new tokens and their bytes, and why it stopped if it did.

    `piece` is raw bytes because a token may end in the middle of a UTF-8 character; the text
    layer (core.textstream) decides when the text is whole.
    """

    token_ids: tuple[int, ...]
    piece: bytes
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids, when asked for


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the rest of the server needs to know about a loaded model."""

    context_length: int
    vocab_size: int
    chat_template: str | None
    bos_token: str
    eos_token: str


@dataclass(frozen=True, slots=True)
class EmbeddingModelInfo:
    """What /v1/embeddings needs to know about a loaded embedding model."""

    dimensions: int
    context_length: int  # tokens per input, special tokens included
    vocab_size: int


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build an engine: the tunables the operator set, for whichever engine reads them
    (the rest are ignored). Sent to the engine's process with the model path."""

    context_length: int = 0  # tokens one request may hold; 0: the model's own
    threads: int | None = None  # CPU threads; None: all cores
    batch_size: int = 512  # llama.cpp: tokens per decoding step
    parallel: int = 16  # sequences decoded together (llama.cpp), KV cache sized for (vLLM/CPU)
    kv_cache_tokens: int = 0  # llama.cpp, vLLM on CPU: KV cells in all; 0: contract.kv_layout
    kv_unified: bool = True  # llama.cpp: one pool for all slots; False: a share per slot
    gpu_layers: int = -1  # llama.cpp: layers offloaded to a GPU when there is one; -1: all
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vLLM engine arguments as given
    # vLLM on CPU: KV cache size in GiB; None: what the model needs (weights.footprint sizes it
    # before the load); "free": vLLM's own sizing, from what is free on its NUMA node.
    cpu_kv_cache_gib: float | Literal["free"] | None = None
    max_batch: int = 32  # MLX: sequences decoded together
    # vLLM sharded over Ray (tensor/pipeline parallel): the cluster, and the placement group
    # (hex id) its workers go in, reserved by whoever started this engine.
    ray_address: str | None = None
    ray_placement_group: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One replica of a model served by several engines at once (on a cluster): where it
    runs, whether it serves, and its engine's gauges (as Engine.stats gives them)."""

    replica_id: str
    node: str
    state: str  # the engine's state ("ready", "restarting", "failed"), or "unreachable"
    stats: dict[str, float] = field(default_factory=dict)
