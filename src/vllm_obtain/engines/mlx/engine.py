"""MLX through mlx-lm: Apple Silicon's unified memory and GPU (and a CPU build elsewhere).

Concurrent requests are batched with mlx-lm's BatchGenerator (continuous batching: a request
joins the running batch at the next step, a finished one leaves). MLX arrays are not shared across
threads, so one dedicated thread owns the model and the generator.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from vllm_obtain.contract import (
    CONSTRAINED_OUTPUT,
    PROGRESS_STAT,
    STANDARD_SAMPLING,
    EngineError,
    EngineNotInstalledError,
    EngineState,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
)
from vllm_obtain.engines.engine_thread import Courier, Job, stream_job
from vllm_obtain.engines.mlx.json_grammar import JsonGrammars

# OpenAI's penalties count what was generated so far; mlx-lm looks back a fixed window.
PENALTY_WINDOW = 64


@dataclass
class _Sequence:
    job: Job
    detokenizer: Any


def seeded_sampler(sampling: SamplingParams) -> Callable[[Any], Any]:
    """A sampler with its own random key, so a seed gives the same tokens whatever else is in
    the batch (mlx-lm's samplers share MLX's global random state)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    if sampling.temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
    key = mx.random.key(seed & 0xFFFFFFFF)

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, step_key = mx.random.split(key)
        if sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, sampling.top_p)
        return mx.random.categorical(logprobs * (1.0 / sampling.temperature), key=step_key)

    return sample


# Finished sequences' KV caches kept for prefix reuse (mlx_lm.server's default count).
PROMPT_CACHE_ENTRIES = 10
MODEL_KEY = "served"  # the prompt cache's key: this engine serves one model


def _prefill_step_size() -> int:
    """Prompt tokens read per generator step, each step also decoding the running sequences:
    mlx-lm's 2048 on a GPU; 256 on MLX's CPU backend, which reads about 15 tokens a second
    here (2048 would stall the other streams, and the watchdog, for over two minutes)."""
    import mlx.core as mx

    return 2048 if mx.default_device().type == mx.gpu else 256


class _CountingModel:
    """The model as BatchGenerator calls it, counting the tokens of every forward pass: one
    generator step reads a whole prompt, in chunks, so this count is the progress the
    supervisor sees during a long prefill (PROGRESS_STAT)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.tokens = 0

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        self.tokens += int(inputs.size)
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class MlxEngine:
    """Serves one Hugging Face-format (or mlx-community) model directory with mlx-lm."""

    name = "mlx"
    supported_params = STANDARD_SAMPLING | CONSTRAINED_OUTPUT | {"logprobs", "logit_bias"}
    state: EngineState = "ready"

    def __init__(self, model_dir: Path, *, context_length: int = 0, max_batch: int = 32) -> None:
        self.model_dir = Path(model_dir)
        self._context_length = context_length
        self._max_batch = max_batch
        self.max_running = max_batch
        self._model: Any = None
        self._tokenizer: Any = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._courier: Courier | None = None
        self._active = 0
        self._grammars: JsonGrammars | None = None  # made on the first JSON request
        self._pieces: list[bytes] | None = None
        self._prompt_cache: Any = None  # mlx-lm's LRUPromptCache, made on the engine thread
        self._forward: _CountingModel | None = None
        self.prefix_tokens_reused = 0

    async def load(self) -> ModelInfo:
        try:
            from mlx_lm import load
        except ImportError as exc:
            raise EngineNotInstalledError(
                "the MLX engine is not installed: ./install.sh --engines mlx"
            ) from exc
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        self._courier = Courier(loop)

        def run() -> None:
            try:
                loaded = load(str(self.model_dir))
                self._model, self._tokenizer = loaded[0], loaded[1]
            except BaseException as exc:
                loop.call_soon_threadsafe(ready.set_exception, exc)
                return
            loop.call_soon_threadsafe(ready.set_result, None)
            self._serve()

        self._thread = threading.Thread(target=run, name="mlx-engine", daemon=True)
        self._thread.start()
        await ready
        config = json.loads((self.model_dir / "config.json").read_text())
        context = self._context_length or int(config.get("max_position_embeddings", 4096))
        logger.info("MLX loaded {} (context {})", self.model_dir.name, context)
        return ModelInfo(
            context_length=context,
            vocab_size=int(config["vocab_size"]),
            chat_template=getattr(self._tokenizer, "chat_template", None),
            bos_token=self._tokenizer.bos_token or "",
            eos_token=self._tokenizer.eos_token or "",
        )

    async def unload(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        ids: list[int] = await asyncio.to_thread(
            self._tokenizer.encode, text, add_special_tokens=add_special
        )
        return ids

    def stats(self) -> dict[str, float]:
        return {
            "running": self._active,
            "waiting": self._jobs.qsize(),
            "prefix_tokens_reused": self.prefix_tokens_reused,
            PROGRESS_STAT: self._forward.tokens if self._forward is not None else 0,
        }

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        if self._thread is None or self._courier is None:
            raise EngineError("the MLX engine is not running")
        return stream_job(self._jobs, self._courier, request, self.name)

    # --- engine thread -------------------------------------------------------------------

    def _serve(self) -> None:
        from mlx_lm.generate import BatchGenerator, StopSequences

        eos = sorted(self._tokenizer.eos_token_ids)
        self._forward = _CountingModel(self._model)
        generator = BatchGenerator(
            self._forward,  # type: ignore[arg-type]  # it calls the model and reads attributes
            stop_tokens=[[t] for t in eos],
            completion_batch_size=self._max_batch,
            prefill_step_size=_prefill_step_size(),
        )
        no_stop = StopSequences(None)
        running: dict[int, _Sequence] = {}
        courier = self._courier
        assert courier is not None
        while True:
            courier.flush()  # what the last step emitted, all at once
            try:
                admitted = self._admit(block=not running)
            except _Shutdown:
                break
            for job in admitted:
                try:
                    uid = self._insert(generator, job, no_stop)
                except Exception as exc:  # refused by mlx-lm: this request fails, others go on
                    job.emit(exc)
                    continue
                running[uid] = _Sequence(job, self._untrimmed_detokenizer())
            gone = [uid for uid, seq in running.items() if seq.job.cancelled.is_set()]
            if gone:
                generator.remove(gone)
                for uid in gone:
                    del running[uid]
            self._active = len(running)
            if not running:
                continue
            try:
                _, responses = generator.next()
            except Exception as exc:
                logger.exception("MLX generation step failed")
                for seq in running.values():
                    seq.job.emit(exc)
                generator.remove(list(running))
                running.clear()
                continue
            for response in responses:
                self._emit(running, response, eos)
        courier.flush()
        generator.close()

    def _admit(self, *, block: bool) -> list[Job]:
        jobs: list[Job] = []
        try:
            first = self._jobs.get(block=block)
        except queue.Empty:
            return jobs
        while True:
            if first is None:
                raise _Shutdown
            if not first.cancelled.is_set():
                jobs.append(first)
            try:
                first = self._jobs.get_nowait()
            except queue.Empty:
                return jobs

    def _insert(self, generator: Any, job: Job, no_stop: Any) -> int:
        from mlx_lm.sample_utils import make_logits_processors

        sampling = job.request.sampling
        processors = make_logits_processors(
            logit_bias=dict(sampling.logit_bias) or None,
            presence_penalty=sampling.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=sampling.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
        )
        if job.request.json_output is not None:
            # Last, so that it masks whatever the penalties left.
            processors.append(self._json_grammars().processor(job.request.json_output))
        prompt = list(job.request.prompt_tokens)
        cache, cached = self._cached_prefix(prompt, seeded=sampling.seed is not None)
        uid: int = generator.insert(
            [prompt[len(cached) :]],
            max_tokens=[job.request.max_tokens],
            caches=[cache],
            all_tokens=[cached],
            samplers=[seeded_sampler(sampling)],
            logits_processors=[processors],
            stop_sequences=[no_stop] if sampling.ignore_eos else None,
        )[0]
        return uid

    def _cached_prefix(self, prompt: list[int], *, seeded: bool) -> tuple[Any, list[int]]:
        """The KV cache of the longest cached prefix of `prompt` (from finished sequences, as
        mlx_lm.server keeps them), and those tokens; at least one prompt token is left to
        evaluate. A seeded request starts afresh, so its text does not depend on the cache."""
        from mlx_lm.models.cache import (
            LRUPromptCache,
            can_trim_prompt_cache,
            trim_prompt_cache,
        )

        if self._prompt_cache is None:
            self._prompt_cache = LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES)
        if seeded:
            return None, []
        cache, rest = self._prompt_cache.fetch_nearest_cache(MODEL_KEY, prompt)
        if cache is None:
            return None, []
        if not rest:  # all of it cached: evaluate the last token again for its logits
            if not can_trim_prompt_cache(cache):
                return None, []
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        cached = prompt[: len(prompt) - len(rest)]
        self.prefix_tokens_reused += len(cached)
        return cache, cached

    def _keep_cache(self, response: Any) -> None:
        """A finished sequence's KV cache, for the next prompt that shares its prefix."""
        cache, tokens = (
            getattr(response, "prompt_cache", None),
            getattr(response, "all_tokens", None),
        )
        if cache and tokens and self._prompt_cache is not None:
            self._prompt_cache.insert_cache(MODEL_KEY, list(tokens), cache)

    def _untrimmed_detokenizer(self) -> Any:
        """mlx-lm's detokenizers drop the leading space of the first token, as a chat window
        wants; an API must keep it ("The capital of France is" -> " Paris")."""
        detokenizer = self._tokenizer.detokenizer
        if hasattr(detokenizer, "trim_space"):  # SentencePiece
            detokenizer.trim_space = False
        if hasattr(detokenizer, "_maybe_trim_space"):  # byte-level BPE
            detokenizer._maybe_trim_space = lambda text: text
        return detokenizer

    def _json_grammars(self) -> JsonGrammars:
        if self._grammars is None:
            self._grammars = JsonGrammars(
                self._tokenizer._tokenizer, sorted(self._tokenizer.eos_token_ids)
            )
        return self._grammars

    def _emit(self, running: dict[int, _Sequence], response: Any, eos: list[int]) -> None:
        seq = running.get(response.uid)
        if seq is None:
            return
        token, reason = int(response.token), response.finish_reason
        if reason is not None:
            del running[response.uid]
            if seq.job.request.sampling.seed is None:
                self._keep_cache(response)
        if reason == "stop" and token in eos:
            seq.detokenizer.finalize()
            seq.job.emit(TokenChunk((token,), seq.detokenizer.last_segment.encode(), "stop"))
            return
        seq.detokenizer.add_token(token)
        if reason is not None:
            seq.detokenizer.finalize()
        piece = seq.detokenizer.last_segment.encode()
        top = seq.job.request.logprobs
        logprobs = (self._logprob(response.logprobs, token, top),) if top is not None else ()
        finish: Any = "length" if reason == "length" else reason
        seq.job.emit(TokenChunk((token,), piece, finish, logprobs))

    def _logprob(self, log_probs: Any, token: int, top: int) -> TokenLogprob:
        """mlx-lm's log-probabilities are taken after the logits processors (penalties, bias,
        JSON mask): what the sampler chose from."""
        import mlx.core as mx

        pieces = self._token_pieces()
        best: list[int] = []
        if top:
            ids: Any = mx.argpartition(-log_probs, top - 1)[:top].tolist()
            best = [int(t) for t in ids]
        values = log_probs[mx.array([token, *best])].tolist()
        ranked = sorted(zip(best, values[1:], strict=True), key=lambda pair: -pair[1])
        return TokenLogprob(pieces[token], values[0], tuple((pieces[t], v) for t, v in ranked))

    def _token_pieces(self) -> list[bytes]:
        """Each token's text on its own (made once, on the first request for logprobs)."""
        if self._pieces is None:
            decode = self._tokenizer._tokenizer.decode
            size = len(self._tokenizer._tokenizer)
            self._pieces = [decode([t]).encode() for t in range(size)]
        return self._pieces


class _Shutdown(Exception):
    """The engine was asked to stop."""
