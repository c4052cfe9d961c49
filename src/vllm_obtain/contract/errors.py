"""The errors an engine raises. Each says what the client should be told: the request's own
fault (400 naming the param), the engine's state (503, retry), or a failure (500)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine failed while serving a request; the request gets a 500, the server lives on."""


class EngineRequestError(EngineError):
    """The engine cannot do what this request asks (say, a JSON schema its grammar compiler
    refuses): the request gets a 400 naming `param`; nothing else is affected."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailableError(EngineError):
    """The engine cannot serve right now (loading, or restarting after a fault): retry
    shortly, 503."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineNotInstalledError(RuntimeError):
    """The engine's package is missing; the message says how to install it."""
