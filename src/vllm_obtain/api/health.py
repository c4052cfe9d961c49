"""GET /health: whether the server can answer, and what its engines are doing."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vllm_obtain.api.dependencies import registry_of

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    models = registry_of(request).loaded()
    body = {
        "status": "ok" if models else "loading",
        "models": [{"id": m.id, "engine": m.engine.name, **m.engine.stats()} for m in models],
    }
    return JSONResponse(body, status_code=200 if models else 503)
