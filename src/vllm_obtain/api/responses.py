"""The Responses API: POST /v1/responses (plain and streamed), and the stored responses:
GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.

A request becomes the chat pipeline's request (messages for the chat template, tools,
constrained output, sampling) and runs on the same path: one copy of tool parsing and JSON
enforcement for both APIs.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from vllm_obtain.api.access import caller_of
from vllm_obtain.api.errors import InvalidRequestError, NotFoundError
from vllm_obtain.api.request_scope import (
    answer_stream,
    note_prompt,
    request_id_of,
    served_model,
)
from vllm_obtain.api.response_events import ResponseBuilder, built_response, response_events
from vllm_obtain.api.responses_protocol import (
    CreateResponseRequest,
    DeletedResponse,
    ResponseItemList,
    conversation_of,
    input_item_resources,
    response_skeleton,
)
from vllm_obtain.api.responses_protocol import Response as ResponseObject
from vllm_obtain.api.streaming import primed, sse_response, unless_client_leaves
from vllm_obtain.core.planning import plan_chat
from vllm_obtain.core.response_store import ResponseStore, StoredResponse

router = APIRouter(tags=["responses"])


def store_of(request: Request) -> ResponseStore | None:
    store: ResponseStore | None = getattr(request.app.state, "response_store", None)
    return store


@router.post("/v1/responses", response_model=ResponseObject)
async def create_response(body: CreateResponseRequest, request: Request) -> Response:
    if (param := body.unsupported_param()) is not None:
        raise InvalidRequestError(body.unsupported_message(param), param=param, code="unsupported")
    model = await served_model(request, body.model)
    store = store_of(request)
    owner = owner_of(request)
    earlier = await previous_conversation(store, body.previous_response_id, owner)
    items = body.input_items()
    conversation = [*earlier, *conversation_of(items)]
    # Instructions hold for this turn only: a next turn has its own (as OpenAI's do).
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    note_prompt(request, [*instructions, *conversation])
    tools = body.tool_use()
    plan = await plan_chat(
        model,
        [*instructions, *conversation],
        tools,
        body.to_options(),
        request_id=request_id_of(request),
        truncate=body.truncation == "auto",
    )
    kept = store is not None and body.store is not False
    skeleton = response_skeleton(body, model=model.id, store=kept, created_at=int(time.time()))
    builder = ResponseBuilder(skeleton, tools, input_tokens=plan.prompt_tokens)
    deltas = answer_stream(request, model, plan)

    async def keep(response: ResponseObject) -> None:
        if store is not None and kept:
            await store.put(
                StoredResponse(
                    response.id,
                    time.time(),
                    response.model_dump(mode="json"),
                    input_item_resources(items),
                    [*conversation, builder.assistant_message()],
                    owner,
                )
            )

    if body.stream:
        events = response_events(await primed(deltas), builder, on_end=keep)
        return sse_response(events, named=True)
    response = await unless_client_leaves(request, built_response(deltas, builder))
    await keep(response)
    return JSONResponse(response.model_dump(mode="json"))


def owner_of(request: Request) -> str:
    """Whose stored responses a request may see: its key's name ('' without keys)."""
    return caller_of(request.scope).name


async def previous_conversation(
    store: ResponseStore | None, response_id: str | None, owner: str
) -> list[dict[str, Any]]:
    """The conversation a stored response ended, for the turn that continues it."""
    if response_id is None:
        return []
    if store is None:
        raise InvalidRequestError(
            "This server does not store responses (--responses-store none), so "
            "previous_response_id cannot be used: send the whole conversation as input.",
            param="previous_response_id",
        )
    stored = await store.get(response_id, owner)
    if stored is None:
        raise InvalidRequestError(
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return stored.conversation


def not_stored(response_id: str) -> NotFoundError:
    return NotFoundError(
        f"No response with id '{response_id}' is stored here.",
        param="response_id",
        code="response_not_found",
    )


async def stored(request: Request, response_id: str) -> StoredResponse:
    store = store_of(request)
    found = await store.get(response_id, owner_of(request)) if store is not None else None
    if found is None:
        raise not_stored(response_id)
    return found


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def retrieve_response(
    response_id: str, request: Request, stream: bool = False
) -> JSONResponse:
    if stream:
        raise InvalidRequestError(
            "A stored response cannot be streamed again here; leave out 'stream'.",
            param="stream",
            code="unsupported",
        )
    return JSONResponse((await stored(request, response_id)).response)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    store = store_of(request)
    if store is None or not await store.delete(response_id, owner_of(request)):
        raise not_stored(response_id)
    return DeletedResponse(id=response_id)


@router.get("/v1/responses/{response_id}/input_items", response_model=ResponseItemList)
async def list_input_items(
    response_id: str,
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> ResponseItemList:
    """The items a response was asked with, a page at a time (newest first by default, as
    OpenAI lists them); `after` is the last id of the page before."""
    items = (await stored(request, response_id)).input_items
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequestError(f"No input item with id '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return ResponseItemList(
        data=page,
        first_id=page[0]["id"] if page else "",
        last_id=page[-1]["id"] if page else "",
        has_more=len(items) > limit,
    )
