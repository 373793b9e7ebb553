"""The FastAPI application: lifespan (engine start/stop, liveness watch), error mapping, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.admin import router as admin_router
from server.admin.serving import AdminServing
from server.admission import Admission, AdmissionMiddleware
from server.auth import has_bearer_key
from server.body_limit import BodyLimitMiddleware
from server.console.router import console_error_page, install_console
from server.config import Settings
from server.engine import Engine
from server.errors import AuthenticationFailed, InvalidRequest, LetheError, NotFound, RegistryUnavailable
from server.health import readiness
from server.metrics import Metrics
from server.registry.database import UNREACHABLE_ERRORS
from server.openai import router as openai_router
from server.openai.limits import RequestLimits
from server.openai.protocol import ErrorBody, ErrorResponse
from server.openai.router import ClientDisconnected
from server.openai.serving import OpenAIServing
from server.runtime import Runtime

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499


def _error(status: int, body: ErrorResponse, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def endpoint_label(request: Request) -> str:
    """The metrics label of a ``/v1`` request: the template of the route its path matches, after ``/v1/``
    (``chat/completions``), or ``other`` for a path no route serves, so unknown paths add no time series. Matched here
    rather than read from the routing, which a request refused by middleware (413, 429) never reaches."""
    for route in request.app.router.routes:
        path = getattr(route, "path", "")
        if path.startswith("/v1/") and route.matches(request.scope)[0] != Match.NONE:
            return path.removeprefix("/v1/")
    return "other"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First validation error as one readable line plus its field path (OpenAI's ``param``)."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    message = str(first.get("msg", "Invalid value.")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LetheError)
    async def _lethe_error(request: Request, exc: LetheError) -> Response:
        page = console_error_page(request, exc)  # the web console shows the error on a page
        return page if page is not None else _error(exc.status, exc.to_response(), exc.headers)

    async def _registry_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # The database is down or unreachable (its driver's message may name hosts: it is logged, not returned).
        logger.warning("registry.unavailable", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        error = RegistryUnavailable()
        return _error(error.status, error.to_response(), error.headers)

    for unreachable in UNREACHABLE_ERRORS:  # the same errors the snapshot holder reads as "registry unreachable"
        app.add_exception_handler(unreachable, _registry_unavailable)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        if request.url.path.startswith("/admin/"):
            # The admin API follows SPEC §4: 422 with every field path.
            body = InvalidRequest(message, param=param, code="validation_error").to_response().model_dump()
            body["error"]["details"] = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg")}
                                        for e in exc.errors()]
            return JSONResponse(body, status_code=422)
        return _error(400, InvalidRequest(message, param=param).to_response())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, NotFound(f"No route {exc.detail!s}." if exc.detail != "Not Found" else
                                        "Unknown path.").to_response())
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, ErrorResponse(error=ErrorBody(message=str(exc.detail), type=kind)))

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


def _engine_alive(request: Request) -> bool:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    return engine is not None and engine.alive


def create_app(
    settings: Settings, model_path: Path, served_model_name: str, request_exit: Callable[[], None] | None = None
) -> FastAPI:
    """Build the app; the engine starts in the lifespan. ``request_exit`` is called if the engine dies."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, model_path, served_model_name, metrics)
        engine = runtime.engine
        app.state.registry = runtime.control.registry
        app.state.snapshots = runtime.control.snapshots
        app.state.engine = engine
        app.state.serving = OpenAIServing(runtime.pipeline, engine.info, RequestLimits.from_settings(settings))
        app.state.admin = AdminServing(runtime.control.registry, settings.default_mechanisms,
                                       runtime.control.snapshots, runtime.scoring)
        metrics.engine_up.set(1)

        def on_engine_death() -> None:
            metrics.engine_up.set(0)
            app.state.exit_code = 1
            if request_exit is not None:
                request_exit()

        watcher = asyncio.create_task(engine.watch(on_engine_death))
        try:
            yield
        finally:
            watcher.cancel()
            await runtime.stop()

    app = FastAPI(title="Lethe", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible inference with inference-time unlearning.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.exit_code = 0
    install_error_handlers(app)
    app.include_router(openai_router.router)
    app.include_router(admin_router.router)
    install_console(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.state.admission = Admission(settings.max_concurrent_requests, settings.max_sequences_in_flight)
    generation_paths = [route.path for route in openai_router.router.routes if "POST" in getattr(route, "methods", ())]
    app.add_middleware(AdmissionMiddleware, admission=app.state.admission, paths=generation_paths)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable) -> Response:
        if not request.url.path.startswith("/v1/"):
            return await call_next(request)
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(endpoint_label(request), str(response.status_code)).inc()
        logger.debug("http.response", extra={"path": request.url.path, "status": response.status_code,
                                             "seconds": round(time.perf_counter() - started, 4)})
        return response

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 while the engine is alive: the single probe of vLLM's own server and Docker's ``HEALTHCHECK``, kept a
        liveness probe (restarting a replica because its registry is behind would not help it)."""
        if not _engine_alive(request):
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/health/live")
    async def live(request: Request) -> JSONResponse:
        """Liveness: the process answers and its engine is not dead (a dead engine never recovers: restart it)."""
        engine: Engine | None = getattr(request.app.state, "engine", None)
        if engine is not None and not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness (``server.health.readiness``): the engine is alive and the registry snapshot can be trusted."""
        snapshots = getattr(request.app.state, "snapshots", None)
        decision = readiness(_engine_alive(request), snapshots.health() if snapshots is not None else None,
                             request.app.state.settings.registry_max_staleness_s)
        return JSONResponse(decision.body(), status_code=200 if decision.ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        key = request.app.state.settings.metrics_key
        if key and not has_bearer_key(request, [key]):
            raise AuthenticationFailed("Invalid or missing metrics key.")
        engine: Engine | None = getattr(request.app.state, "engine", None)
        alive = _engine_alive(request)
        metrics.engine_up.set(1 if alive else 0)
        metrics.engine_unfinished.set(engine.unfinished_requests if alive else 0)
        # Job counts come from the control plane's background refresh: a scrape never queries the database.
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
