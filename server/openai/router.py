"""HTTP routes of the OpenAI surface. Thin: parse, authorise, call ``OpenAIServing``, send JSON or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from server.admission import STATE_KEY, AdmissionSlot
from server.auth import has_bearer_key
from server.errors import AuthenticationFailed
from server.openai.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelList
from server.openai.serving import OpenAIServing

T = TypeVar("T")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503, 504)
}


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its engine request has been aborted."""


def require_api_key(request: Request) -> None:
    """Inference is open when ``LETHE_API_KEYS`` is empty; otherwise a listed key is required."""
    keys: list[str] = request.app.state.settings.api_keys
    if keys and not has_bearer_key(request, keys):
        raise AuthenticationFailed()


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def _slot(request: Request) -> AdmissionSlot:
    """The admission slot ``AdmissionMiddleware`` gave this request."""
    return getattr(request.state, STATE_KEY)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` but cancel it (aborting its engine requests) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return _serving(request).models()


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return _respond(await until_disconnected(request, _serving(request).chat(body, _slot(request))))


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return _respond(await until_disconnected(request, _serving(request).completion(body, _slot(request))))
