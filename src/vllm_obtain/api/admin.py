"""Model management: which models this server can serve and where each stands, loading and
unloading them by hand, and fetching new ones (behind the API key when keys are set)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from vllm_obtain.api.errors import InvalidRequestError, OpenAIError
from vllm_obtain.api.request_scope import registry_of
from vllm_obtain.core.registry import ModelStatus

router = APIRouter(tags=["admin"])

# Fetches a model by name (an alias, org/name[:QUANT], a URL), reporting progress as plain
# dicts; returns the id it is served under. Blocking: it runs in a thread. (wiring.pull_model)
ModelPuller = Callable[[str, str | None, Callable[[dict[str, Any]], None]], str]
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


@router.post("/admin/pull")
async def pull(body: PullRequest, request: Request) -> StreamingResponse:
    """Fetch a model, streaming its progress as JSON lines; the last line says the id it is
    served under (`"status": "success"`) or the error."""
    puller: ModelPuller | None = getattr(request.app.state, "model_puller", None)
    if puller is None:
        raise InvalidRequestError("This server cannot pull models.", code="unsupported")
    lines = _pull_lines(request, puller, body)
    return StreamingResponse(lines, media_type="application/x-ndjson")


async def _pull_lines(
    request: Request, puller: ModelPuller, body: PullRequest
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    last_sent: dict[str, float] = {}

    def report(progress: dict[str, Any]) -> None:
        # From the download's thread: throttled, then handed to the event loop.
        now, key = time.monotonic(), f"{progress.get('status')}:{progress.get('file')}"
        finished = progress.get("total") is not None and progress.get("completed") == progress.get(
            "total"
        )
        if not finished and now - last_sent.get(key, 0.0) < PROGRESS_INTERVAL_SECONDS:
            return
        last_sent[key] = now
        loop.call_soon_threadsafe(queue.put_nowait, progress)

    task = asyncio.ensure_future(asyncio.to_thread(puller, body.name, body.sha256, report))
    while not task.done() or not queue.empty():
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield _line(getter.result())
        else:
            getter.cancel()
    try:
        model_id = task.result()
    except Exception as exc:  # the client reads the failure from the stream's last line
        error = OpenAIError(str(exc)) if not isinstance(exc, OpenAIError) else exc
        yield _line({"status": "error", "error": {"message": error.message, "type": "pull_error"}})
        return
    await registry_of(request).refresh()
    yield _line({"status": "success", "id": model_id})


def _line(item: dict[str, Any]) -> bytes:
    return json.dumps(item).encode() + b"\n"
