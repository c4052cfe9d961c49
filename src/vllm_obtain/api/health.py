"""Health: whether the server can answer, what its engines are doing, and the two probes an
orchestrator wants (liveness: restart me; readiness: send me traffic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vllm_obtain.api.request_scope import embedding_models_of, registry_of
from vllm_obtain.contract import ReplicatedEngine
from vllm_obtain.core.registry import ModelEntry, ModelRegistry

router = APIRouter(tags=["health"])


def overall_status(states: Sequence[str]) -> str:
    """ok: every model holding an engine serves (or none does: all idle, loaded on demand);
    loading: none has come up yet; degraded: anything else (an engine restarting after a
    fault, a model unloading, or failed)."""
    if all(s == "ready" for s in states):
        return "ok"
    if all(s == "loading" for s in states):
        return "loading"
    return "degraded"


def engine_report(entry: ModelEntry) -> dict[str, Any]:
    """A model's engine gauges, and each of its replicas when it has several (on a cluster)."""
    if entry.served is None:
        return {}
    engine = entry.served.engine
    report: dict[str, Any] = dict(engine.stats())
    if isinstance(engine, ReplicatedEngine):
        report["replicas"] = [
            {"id": r.replica_id, "node": r.node, "state": r.state, **r.stats}
            for r in engine.replicas()
        ]
    return report


def health_state(entry: ModelEntry) -> str:
    """A model as /health tells it: its engine's state once loaded, else its own."""
    if entry.state == "loaded" and entry.served is not None:
        return entry.served.state
    return entry.state


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while a model can answer (or load on demand); 503 otherwise. The body says why."""
    entries = registry_of(request).entries()
    held = [e for e in entries if e.state != "available"]
    embedders = embedding_models_of(request).models
    states = [health_state(e) for e in held]
    body = {
        "status": overall_status(states + [e.state for e in embedders]),
        "models": [
            {
                "id": e.id,
                "engine": e.source.engine,
                "state": health_state(e),
                **engine_report(e),
            }
            for e in held
        ],
        "available": [e.id for e in entries if e.state == "available"],
        "embedding_models": [
            {"id": e.id, "engine": e.engine_name, "state": e.state, **e.stats()} for e in embedders
        ],
    }
    can_answer = "ready" in states or (bool(entries) and not held)
    return JSONResponse(body, status_code=200 if can_answer else 503)


@router.get("/health/live")
async def liveness(request: Request) -> JSONResponse:
    """Fails only when restarting this server is the cure: an engine that gave up restarting."""
    # An embedding model that never loaded is not cured by a restart; one that gave up is.
    restartable = [e for e in embedding_models_of(request).models if e.embedder is not None]
    states: list[tuple[str, str]] = [(m.id, m.state) for m in registry_of(request).loaded()]
    states += [(e.id, e.state) for e in restartable]
    failed = [model_id for model_id, state in states if state == "failed"]
    if failed:
        return JSONResponse({"status": "failed", "failed": failed}, status_code=503)
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
async def readiness(request: Request) -> JSONResponse:
    """200 when the models named at start, and every model loaded, can take requests now."""
    registry: ModelRegistry = registry_of(request)
    states: dict[str, str] = {
        e.id: health_state(e)
        for e in registry.entries()
        if e.source.pinned or e.state in ("loading", "loaded")
    }
    # An embedding model that could not load does not hold back the chat model's traffic.
    states |= {e.id: e.state for e in embedding_models_of(request).models if e.state != "failed"}
    ready = bool(states or registry.entries()) and all(s == "ready" for s in states.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "models": states},
        status_code=200 if ready else 503,
    )
