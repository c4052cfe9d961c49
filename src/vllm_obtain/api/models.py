"""GET /v1/models and GET /v1/models/{id}: every model this server can serve, loaded or not."""

from __future__ import annotations

from fastapi import APIRouter, Request

from vllm_obtain.api.protocol import ModelCard, ModelList
from vllm_obtain.api.request_scope import embedding_models_of, registry_of
from vllm_obtain.core.embeddings import ServedEmbedder
from vllm_obtain.core.registry import ModelEntry

router = APIRouter(tags=["models"])


def _card(model: ModelEntry | ServedEmbedder) -> ModelCard:
    if isinstance(model, ModelEntry):
        context = model.context_length
    else:
        context = model.info.context_length if model.info is not None else None
    return ModelCard(
        id=model.id, created=model.created, owned_by=model.owned_by, max_model_len=context
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    registry = registry_of(request)
    await registry.refresh()
    served: list[ModelEntry | ServedEmbedder] = [*registry.entries()]
    served += [m for m in embedding_models_of(request).models if m.embedder is not None]
    return ModelList(data=[_card(m) for m in served])


# `:path` because model ids may contain slashes (Hugging Face repo names).
@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    embedder = embedding_models_of(request).find(model_id)
    if embedder is not None and embedder.embedder is not None:
        return _card(embedder)
    return _card(await registry_of(request).find(model_id))
