"""The engine contract: the floor of the package, importing nothing else of it.

Plain data crossing the engine boundary (data), reading token chunks as they pile up (chunks),
the Engine and Embedder protocols and their states (engine), and the errors engines raise
(errors). Everything above speaks these types.
"""

from vllm_obtain.contract.chunks import ChunkQueue, StreamItem
from vllm_obtain.contract.data import (
    EmbeddingModelInfo,
    EngineConfig,
    FinishReason,
    GenerationRequest,
    JsonOutput,
    ModelInfo,
    ReplicaReport,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    WeightFormat,
)
from vllm_obtain.contract.engine import (
    CONSTRAINED_OUTPUT,
    PROGRESS_STAT,
    STANDARD_SAMPLING,
    Embedder,
    Engine,
    EngineState,
    ReplicatedEngine,
)
from vllm_obtain.contract.errors import (
    EngineError,
    EngineNotInstalledError,
    EngineRequestError,
    EngineUnavailableError,
)

__all__ = [
    "CONSTRAINED_OUTPUT",
    "PROGRESS_STAT",
    "STANDARD_SAMPLING",
    "ChunkQueue",
    "Embedder",
    "EmbeddingModelInfo",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineNotInstalledError",
    "EngineRequestError",
    "EngineState",
    "EngineUnavailableError",
    "FinishReason",
    "GenerationRequest",
    "JsonOutput",
    "ModelInfo",
    "ReplicaReport",
    "ReplicatedEngine",
    "SamplingParams",
    "StreamItem",
    "TokenChunk",
    "TokenLogprob",
    "WeightFormat",
]
