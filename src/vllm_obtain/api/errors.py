"""OpenAI's error envelope, and the one place every failure is turned into it.

`{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses, so the official
SDKs raise their usual exception classes (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_obtain.api.param_names import most_telling, param_name
from vllm_obtain.api.protocol import ErrorBody, ErrorResponse
from vllm_obtain.contract import EngineError, EngineRequestError, EngineUnavailableError
from vllm_obtain.core.generation import GenerationTimeoutError
from vllm_obtain.core.planning import ParamError
from vllm_obtain.core.registry import UnknownModelError
from vllm_obtain.core.residency import ModelTooLargeError
from vllm_obtain.core.served_model import QueueFullError
from vllm_obtain.core.templates import ChatTemplateError


class OpenAIError(Exception):
    """An error with the HTTP status and OpenAI `type` it is reported as."""

    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.headers = headers or {}

    def envelope(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )


class InvalidRequestError(OpenAIError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFoundError(OpenAIError):
    status_code = 404
    error_type = "invalid_request_error"


class ClientGoneError(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


class AuthenticationError(OpenAIError):
    status_code = 401
    error_type = "invalid_request_error"


class PermissionDeniedError(OpenAIError):
    status_code = 403
    error_type = "invalid_request_error"


class UnsupportedMediaTypeError(OpenAIError):
    status_code = 415
    error_type = "invalid_request_error"


class PayloadTooLargeError(OpenAIError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(OpenAIError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailableError(OpenAIError):
    status_code = 503


class RequestTimeoutError(OpenAIError):
    status_code = 504
    error_type = "timeout_error"


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(
        error.envelope().model_dump(mode="json"),
        status_code=error.status_code,
        headers=error.headers or None,
    )


def validation_error(exc: RequestValidationError, body_model: Any = None) -> InvalidRequestError:
    """The first problem pydantic found, as OpenAI words it, naming the param by its path in
    `body_model` (the route's request model, when it has one)."""
    first = most_telling(exc.errors(), body_model)
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        )
    loc = first.get("loc", ())
    param = param_name(loc, body_model)
    message = first.get("msg", "invalid value")
    if tuple(loc) == ("body",):
        message = (
            "The request body is empty or not a JSON object: send the parameters as a JSON "
            "object, with 'Content-Type: application/json'."
        )
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}."
    return InvalidRequestError(message, param=param, code="invalid_value")


def body_model_of(request: Request) -> Any:
    """The request model of the route a request matched (None when it takes no body)."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    return getattr(getattr(body_field, "field_info", None), "annotation", None)


def as_openai_error(exc: Exception) -> OpenAIError:
    """Map a domain exception to the error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, UnknownModelError):
        return NotFoundError(str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelTooLargeError):
        return InvalidRequestError(str(exc), param="model", code="model_too_large")
    if isinstance(exc, ParamError):
        return InvalidRequestError(str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ChatTemplateError):
        return InvalidRequestError(str(exc), param="messages", code="invalid_messages")
    if isinstance(exc, GenerationTimeoutError):
        return RequestTimeoutError(str(exc), code="timeout")
    if isinstance(exc, QueueFullError):
        retry = {"Retry-After": str(exc.retry_after)}
        return RateLimitError(str(exc), code="queue_full", headers=retry)
    if isinstance(exc, EngineUnavailableError):
        retry = {"Retry-After": str(exc.retry_after)}
        return ServiceUnavailableError(str(exc), code="engine_unavailable", headers=retry)
    if isinstance(exc, EngineRequestError):
        return InvalidRequestError(str(exc), param=exc.param, code="unsupported")
    if isinstance(exc, EngineError):
        return OpenAIError(f"The engine failed to generate: {exc}", code="engine_error")
    return OpenAIError("The server had an error while processing your request.")


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        error = as_openai_error(exc)
        if error.status_code >= 500:
            logger.opt(exception=exc).error("request failed: {}", exc)
        return error_response(error)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # Nobody is there to read it; 499 (nginx's "client closed request") is for the log.
        return Response(status_code=499)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc, body_model_of(request)))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        elif exc.status_code == 404 and "route" not in request.scope:  # no such route
            message = (
                f"Invalid URL ({request.method} {request.url.path}): this server answers "
                "/v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings and "
                "/v1/models."
            )
        kind = NotFoundError if exc.status_code == 404 else InvalidRequestError
        error = kind(message, headers=dict(exc.headers or {}))
        error.status_code = exc.status_code
        return error_response(error)

    app.add_exception_handler(ClientGoneError, on_client_gone)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for exc_type in (
        OpenAIError,
        UnknownModelError,
        ModelTooLargeError,
        QueueFullError,
        GenerationTimeoutError,
        ParamError,
        ChatTemplateError,
        EngineError,
        Exception,
    ):
        app.add_exception_handler(exc_type, on_domain_error)
