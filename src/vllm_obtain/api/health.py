"""Health: whether the server can answer, what its engines are doing, and the two probes an
orchestrator wants (liveness: restart me; readiness: send me traffic)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vllm_obtain.api.request_scope import embedding_models_of, registry_of
from vllm_obtain.core.registry import ModelRegistry

router = APIRouter(tags=["health"])


def overall_status(states: Sequence[str]) -> str:
    """ok: every model serves; loading: none has come up yet; degraded: anything else (an
    engine restarting after a fault, or failed)."""
    if states and all(s == "ready" for s in states):
        return "ok"
    if all(s == "loading" for s in states):
        return "loading"
    return "degraded"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while at least one model can answer; 503 otherwise. The body says why."""
    models = registry_of(request).all()
    embedders = embedding_models_of(request).models
    states = [m.state for m in models]
    body = {
        "status": overall_status(states + [e.state for e in embedders]),
        "models": [
            {"id": m.id, "engine": m.engine.name, "state": m.state, **m.engine.stats()}
            for m in models
        ],
        "embedding_models": [
            {"id": e.id, "engine": e.engine_name, "state": e.state, **e.stats()} for e in embedders
        ],
    }
    return JSONResponse(body, status_code=200 if "ready" in states else 503)


@router.get("/health/live")
async def liveness(request: Request) -> JSONResponse:
    """Fails only when restarting this server is the cure: an engine that gave up restarting."""
    # An embedding model that never loaded is not cured by a restart; one that gave up is.
    restartable = [e for e in embedding_models_of(request).models if e.embedder is not None]
    states: list[tuple[str, str]] = [(m.id, m.state) for m in registry_of(request).all()]
    states += [(e.id, e.state) for e in restartable]
    failed = [model_id for model_id, state in states if state == "failed"]
    if failed:
        return JSONResponse({"status": "failed", "failed": failed}, status_code=503)
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
async def readiness(request: Request) -> JSONResponse:
    """200 when every model can take requests now."""
    registry: ModelRegistry = registry_of(request)
    states: dict[str, str] = {m.id: m.state for m in registry.all()}
    # An embedding model that could not load does not hold back the chat model's traffic.
    states |= {e.id: e.state for e in embedding_models_of(request).models if e.state != "failed"}
    ready = bool(states) and all(s == "ready" for s in states.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "models": states},
        status_code=200 if ready else 503,
    )
