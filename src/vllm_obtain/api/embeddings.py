"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from vllm_obtain.api.dependencies import embedding_model, record_of
from vllm_obtain.api.errors import InvalidRequestError
from vllm_obtain.api.protocol import (
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
    embedder, info = embedding_model(request, body.model).ready()
    if body.dimensions is not None and body.dimensions != info.dimensions:
        # Only models trained for it (Matryoshka) keep their meaning when cut short.
        raise InvalidRequestError(
            f"This model's embeddings have {info.dimensions} dimensions and cannot be "
            "shortened; leave out 'dimensions'.",
            param="dimensions",
        )
    token_lists = []
    for item in body.inputs():
        tokens = await embedder.tokenize(item) if isinstance(item, str) else item
        if any(not 0 <= t < info.vocab_size for t in tokens):
            raise InvalidRequestError(
                f"input holds a token id outside the vocabulary (0 to {info.vocab_size - 1}).",
                param="input",
            )
        if len(tokens) > info.context_length:
            raise InvalidRequestError(
                f"This model's maximum input length is {info.context_length} tokens; an input "
                f"has {len(tokens)}. Split it into shorter chunks.",
                param="input",
                code="context_length_exceeded",
            )
        token_lists.append(tokens)
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
