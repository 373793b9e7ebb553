"""Typed errors that map one-to-one onto OpenAI error objects.

Logic raises these; the HTTP layer turns them into ``{"error": {"message", "type", "param", "code"}}`` with the right
status. Messages must never carry forget-target contents: they reach inference clients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from server.openai.protocol import ErrorBody, ErrorResponse


class LetheError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "server_error"
    headers: ClassVar[Mapping[str, str]] = {}  # extra response headers (``Retry-After``)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))


class InvalidRequest(LetheError):
    status = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, message: str, *, param: str = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class PromptTooLongForGate(InvalidRequest):
    """A prompt the forget-target gate would have to read in part: refused, since an unread part may be about a
    target (``LETHE_GATE_MAX_WINDOWS``)."""

    def __init__(self, needed: int, limit: int, *, param: str) -> None:
        super().__init__(
            f"The prompt is too long for this server's forget-target gate: reading it takes {needed} text windows "
            f"and the gate reads at most {limit} per prompt. Shorten the prompt or split the request.",
            param=param, code="prompt_too_long_for_gate")


class RequestTooLarge(InvalidRequest):
    """A list in the request is longer than this server accepts (``LETHE_MAX_*``; OpenAI's code for it:
    ``array_above_max_length``)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message, param=param, code="array_above_max_length")


class AuthenticationFailed(LetheError):
    status = HTTPStatus.UNAUTHORIZED
    type = "authentication_error"

    def __init__(self, message: str = "Invalid or missing API key.") -> None:
        super().__init__(message, code="invalid_api_key")


class NotFound(LetheError):
    status = HTTPStatus.NOT_FOUND
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model", code="model_not_found")


class Unprocessable(LetheError):
    """A well-formed admin request whose content cannot work (SPEC §4: 422)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="validation_error")


class Conflict(LetheError):
    status = HTTPStatus.CONFLICT
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="conflict")


class AdminDisabled(LetheError):
    status = HTTPStatus.FORBIDDEN
    type = "permission_error"

    def __init__(self) -> None:
        super().__init__("The admin API is disabled: set LETHE_ADMIN_KEY (or LETHE_ADMIN_KEYS) to enable it.",
                         code="admin_disabled")


class PayloadTooLarge(LetheError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body exceeds the limit of {limit} bytes.", code="payload_too_large")


class Overloaded(LetheError):
    """The server holds as many inference requests (or sequences) as it admits: retry shortly (OpenAI's 429 shape:
    type ``requests``, code ``rate_limit_exceeded``). Answered alike for every request, before its prompt is read."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "requests"
    headers = {"Retry-After": "1"}

    def __init__(self, message: str) -> None:
        super().__init__(message, code="rate_limit_exceeded")


class EngineUnavailable(LetheError):
    """The vLLM engine died or is shutting down; the orchestrator restarts the process."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "server_error"

    def __init__(self, message: str = "The inference engine is unavailable.") -> None:
        super().__init__(message, code="engine_unavailable")


class RegistryUnavailable(LetheError):
    """The forget-target registry cannot be read. Inference is refused with it only while the replica has loaded no
    snapshot yet (it is starting, or its database has been unreachable since it started): serving then could serve a
    registered target unguarded. Once a snapshot is loaded, serving goes on from it through a database outage, and only
    what needs the database (the admin API) is refused, with nothing half-done committed."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "server_error"
    headers = {"Retry-After": "5"}

    DATABASE_DOWN = "The registry database is unavailable; nothing was changed. Retry later."

    def __init__(self, message: str = DATABASE_DOWN) -> None:
        super().__init__(message, code="registry_unavailable")


class RequestTimeout(LetheError):
    status = HTTPStatus.GATEWAY_TIMEOUT
    type = "server_error"

    def __init__(self, message: str = "The request took too long and was aborted.") -> None:
        super().__init__(message, code="timeout")


class GuardFailed(LetheError):
    """A prompt hit a forget target but its protection could not be applied: refused, never served unguarded."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "server_error"

    def __init__(self) -> None:
        super().__init__("This request cannot be served right now; please retry later.", code="guard_unavailable")


async def send_error(send: Any, error: LetheError) -> None:
    """Answer ``error`` from ASGI middleware, which runs outside FastAPI's exception handlers."""
    body = json.dumps(error.to_response().model_dump()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((name.lower().encode(), value.encode()) for name, value in error.headers.items())]
    await send({"type": "http.response.start", "status": int(error.status), "headers": headers})
    await send({"type": "http.response.body", "body": body})
