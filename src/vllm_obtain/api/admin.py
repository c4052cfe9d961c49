"""Model management: which models this server can serve and where each stands, loading and
unloading them by hand, and fetching new ones (behind the API key when keys are set)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger
from pydantic import BaseModel, Field

from vllm_obtain.api.errors import InvalidRequestError, NotFoundError
from vllm_obtain.api.request_scope import registry_of
from vllm_obtain.core.registry import ModelStatus

router = APIRouter(tags=["admin"])

# Fetches a model by name (an alias, org/name[:QUANT], a URL), reporting progress as plain
# dicts; returns the id it is served under. Blocking: it runs in a thread. (wiring.pull_model)
ModelPuller = Callable[[str, str | None, Callable[[dict[str, Any]], None]], str]
# What this machine has and which engine serves what, as `vllm-obtain doctor` tells it
# (wiring: doctor.system_report, computed once).
SystemReport = Callable[[], dict[str, Any]]
# Progress lines at most this often (the last one of each file always).
PROGRESS_INTERVAL_SECONDS = 0.25


class PullRequest(BaseModel):
    name: str = Field(min_length=1, description="alias, org/name[:QUANT] or a .gguf URL")
    sha256: str | None = Field(None, description="the file's expected SHA-256 (URLs)")


def model_json(status: ModelStatus) -> dict[str, Any]:
    return {"object": "model", **status.__dict__}


@router.get("/admin/models")
async def list_models(request: Request) -> JSONResponse:
    """Every servable model with its state, engine, format, size, memory and keep-alive."""
    registry = registry_of(request)
    await registry.refresh()
    return JSONResponse({"object": "list", "data": [model_json(s) for s in registry.status()]})


def _status_of(request: Request, model_id: str) -> JSONResponse:
    found = next(s for s in registry_of(request).status() if s.id == model_id)
    return JSONResponse(model_json(found))


# `:path` because model ids may contain slashes (Hugging Face repo names).
@router.post("/admin/models/{model_id:path}/load")
async def load_model(model_id: str, request: Request) -> JSONResponse:
    """Load a model now (evicting idle ones if the budget asks); it then idles as any other."""
    await registry_of(request).load(model_id)
    return _status_of(request, model_id)


@router.post("/admin/models/{model_id:path}/unload")
async def unload_model(model_id: str, request: Request) -> JSONResponse:
    """Unload a model once the requests using it have finished."""
    await registry_of(request).unload(model_id)
    return _status_of(request, model_id)


@router.get("/admin/system")
async def system(request: Request) -> JSONResponse:
    """The machine, the engines installed, and the engine each model gets, and why."""
    report: SystemReport | None = request.app.state.system_report
    if report is None:
        raise NotFoundError("This server has no system report.", code="not_found")
    # Probing the llama.cpp build may spawn a process: not on the event loop.
    return JSONResponse(await asyncio.to_thread(report))


@router.post("/admin/pull")
async def pull(body: PullRequest, request: Request) -> StreamingResponse:
    """Fetch a model, streaming its progress as JSON lines; the last line says the id it is
    served under (`"status": "success"`) or the error."""
    puller: ModelPuller | None = getattr(request.app.state, "model_puller", None)
    if puller is None:
        raise InvalidRequestError("This server cannot pull models.", code="unsupported")
    lines = _pull_lines(request, puller, body)
    return StreamingResponse(lines, media_type="application/x-ndjson")


@dataclass(frozen=True)
class _Pulled:
    """How a pull ended: the id it is served under, or why not."""

    model_id: str = ""
    error: Exception | None = None


async def _pull_lines(
    request: Request, puller: ModelPuller, body: PullRequest
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | _Pulled] = asyncio.Queue()
    last_sent: dict[str, float] = {}

    def hand_over(item: dict[str, Any] | _Pulled) -> None:
        with contextlib.suppress(RuntimeError):  # the server has stopped meanwhile
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def report(progress: dict[str, Any]) -> None:
        # From the download's thread: throttled, then handed to the event loop.
        now, key = time.monotonic(), f"{progress.get('status')}:{progress.get('file')}"
        total = progress.get("total")
        finished = total is not None and progress.get("completed") == total
        if finished or now - last_sent.get(key, 0.0) >= PROGRESS_INTERVAL_SECONDS:
            last_sent[key] = now
            hand_over(progress)

    def download() -> None:
        try:
            hand_over(_Pulled(model_id=puller(body.name, body.sha256, report)))
        except Exception as exc:  # the client reads it from the stream's last line
            hand_over(_Pulled(error=exc))

    # A thread of its own, not the default executor's: a download may take an hour, and loads
    # and model scans need that pool meanwhile. A client that leaves does not stop it.
    threading.Thread(target=download, name=f"pull {body.name}", daemon=True).start()
    while not isinstance(item := await queue.get(), _Pulled):
        yield _line(item)
    if item.error is not None:
        logger.warning("pulling {} failed: {}", body.name, item.error)
        error = {"message": str(item.error), "type": "pull_error"}
        yield _line({"status": "error", "error": error})
        return
    await registry_of(request).refresh(force=True)
    logger.info("pulled {}: served as {}", body.name, item.model_id)
    yield _line({"status": "success", "id": item.model_id})


def _line(item: dict[str, Any]) -> bytes:
    return json.dumps(item).encode() + b"\n"
