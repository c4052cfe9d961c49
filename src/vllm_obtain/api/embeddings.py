"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from vllm_obtain.api.protocol import (
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from vllm_obtain.api.request_scope import embedding_model, record_of
from vllm_obtain.core.planning import plan_embedding

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
    embedder, info = embedding_model(request, body.model).ready()
    token_lists = await plan_embedding(embedder, info, body.inputs(), dimensions=body.dimensions)
    vectors = await embedder.embed(token_lists)
    prompt_tokens = sum(len(t) for t in token_lists)
    record_of(request).prompt_tokens = prompt_tokens
    return EmbeddingList(
        data=[
            EmbeddingData(index=i, embedding=_encoded(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
