"""Routes of the web console (``/admin/ui``): HTTP only. Every action calls the admin API's serving functions
(``server/admin/serving.py``) with the session's admin key id as the actor, so it lands in the admin trail exactly
as the same call over REST would.

Pages are ``async`` (a form is read with ``await``); everything that touches the database runs in the thread pool,
as the REST routes do. Errors become the page they happened on, with the message and the API's status code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from server.admin.keys import key_holder
from server.admin.protocol import TargetOut
from server.admin.serving import AdminServing
from server.console import csrf, forms, sessions
from server.console.rendering import render
from server.errors import LetheError
from server.registry.console_sessions import ConsoleSession
from server.registry.records import LEGAL_BASES, ActionFilter, TombstoneFilter
from server.registry.trail import ACTIONS
from server.verification.plots import report_plots

logger = logging.getLogger(__name__)

T = TypeVar("T")
PAGE = 50
REFRESH_S = 3
LISTING_FILTERS = {"actions": ("actor", "action", "target_id", "since", "until"),
                   "tombstones": ("target_id", "reference", "legal_basis", "since", "until")}

router = APIRouter(prefix=sessions.PATH, include_in_schema=False)


class LoginRequired(Exception):
    """No valid session: the browser is sent to the login form."""


def _serving(request: Request) -> AdminServing:
    return request.app.state.admin


async def _call(function: Callable[..., T], *args: Any) -> T:
    return await run_in_threadpool(function, *args)


async def _session(request: Request) -> ConsoleSession:
    if not request.app.state.settings.environment_admin_keys:
        raise LoginRequired()
    session = await _call(sessions.current_session, request)
    if session is None:
        raise LoginRequired()
    return session


async def _form(request: Request, session: ConsoleSession) -> Mapping[str, Any]:
    """The posted form, once its CSRF token is the session's."""
    form = await request.form()
    csrf.check(session.csrf, form.get(csrf.FIELD))
    return form


def _page(request: Request, template: str, session: ConsoleSession | None, status: int = 200,
          **context: Any) -> HTMLResponse:
    return HTMLResponse(render(template, request=request, session=session, **context), status_code=status)


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


# ---- login -----------------------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
async def home(request: Request) -> Response:
    return _see_other(f"{sessions.PATH}/targets")


@router.get("/login")
async def login_form(request: Request, message: str | None = None) -> Response:
    disabled = not request.app.state.settings.environment_admin_keys
    token = csrf.new_token()
    response = _page(request, "login.html", None, 403 if disabled else 200, login_csrf=token, disabled=disabled,
                     message=LOGIN_MESSAGES.get(message or ""))
    sessions.set_cookie(response, request, sessions.LOGIN_COOKIE, token, sessions.LOGIN_FORM_S)
    return response


LOGIN_MESSAGES = {"logged-out": "You are logged out.", "expired": "Your session has ended: log in again."}


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    csrf.check(request.cookies.get(sessions.LOGIN_COOKIE), form.get(csrf.FIELD))
    settings = request.app.state.settings
    serving = _serving(request)
    key = form.get("key")
    key_id = None
    if settings.environment_admin_keys and isinstance(key, str) and len(key) <= 200:
        key_id = await _call(key_holder, key.strip(), settings.environment_admin_keys, serving.admin_key_holder)
    if key_id is None:
        token = csrf.new_token()
        response = _page(request, "login.html", None, 401, login_csrf=token, disabled=False,
                         error="That is not a valid admin key.")
        sessions.set_cookie(response, request, sessions.LOGIN_COOKIE, token, sessions.LOGIN_FORM_S)
        return response
    token, _ = await _call(serving.open_console_session, key_id, settings.console_session_s)
    logger.info("console.login", extra={"actor": key_id})
    response = _see_other(f"{sessions.PATH}/targets")
    sessions.set_cookie(response, request, sessions.COOKIE, token, int(settings.console_session_s))
    sessions.clear_cookie(response, request, sessions.LOGIN_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = await _session(request)
    await _form(request, session)
    await _call(_serving(request).close_console_session, request.cookies.get(sessions.COOKIE, ""))
    logger.info("console.logout", extra={"actor": session.key_id})
    response = _see_other(f"{sessions.PATH}/login?message=logged-out")
    sessions.clear_cookie(response, request, sessions.COOKIE)
    return response


# ---- targets ---------------------------------------------------------------------------------------------------


def _refreshing(targets: list[TargetOut]) -> bool:
    """Whether a page showing these targets should refresh itself: something about them is still changing."""
    return any(t.status == "preparing" or any(job.status in ("queued", "running") for job in t.jobs) for t in targets)


@router.get("/targets")
async def targets(request: Request) -> Response:
    session = await _session(request)
    listing = await _call(_serving(request).list_targets)
    return _page(request, "targets.html", session, targets=listing.data,
                 refresh=REFRESH_S if _refreshing(listing.data) else None, flash=request.query_params.get("done"))


def _register_page(request: Request, session: ConsoleSession, status: int = 200, **context: Any) -> HTMLResponse:
    defaults = request.app.state.settings.default_mechanisms
    context.setdefault("values", {})
    context.setdefault("checked", list(defaults))
    return _page(request, "register.html", session, status, mechanisms=forms.MECHANISM_NAMES,
                 legal_bases=LEGAL_BASES, **context)


@router.get("/targets/new")
async def register_form(request: Request) -> Response:
    return _register_page(request, await _session(request))


@router.post("/targets")
async def register(request: Request) -> Response:
    session = await _session(request)
    form = await _form(request, session)
    checked = [name for name in forms.MECHANISM_NAMES if form.get(f"mechanism_{name}")]
    try:
        body = forms.target_create(form, checked)
        target = await _call(_serving(request).create_target, body, session.key_id)
    except forms.FormInvalid as exc:
        return _register_page(request, session, 422, values=dict(form), checked=checked, errors=exc.messages)
    except LetheError as exc:
        return _register_page(request, session, int(exc.status), values=dict(form), checked=checked,
                              errors=[exc.message])
    return _see_other(f"{sessions.PATH}/targets/{target.id}?done=registered")


async def _target_page(request: Request, session: ConsoleSession, target_id: str, status: int = 200,
                       **context: Any) -> HTMLResponse:
    target = await _call(_serving(request).get_target, target_id)
    return _page(request, "target.html", session, status, target=target, values=forms.form_values(target),
                 mechanisms=forms.MECHANISM_NAMES, legal_bases=LEGAL_BASES,
                 refresh=REFRESH_S if _refreshing([target]) else None, **context)


@router.get("/targets/{target_id}")
async def target(request: Request, target_id: str) -> Response:
    session = await _session(request)
    return await _target_page(request, session, target_id, flash=request.query_params.get("done"))


@router.post("/targets/{target_id}")
async def patch(request: Request, target_id: str) -> Response:
    session = await _session(request)
    form = await _form(request, session)
    serving = _serving(request)
    current = await _call(serving.get_target, target_id)
    checked = [name for name in forms.MECHANISM_NAMES if form.get(f"mechanism_{name}")]
    try:
        body = forms.target_patch(form, checked, current)
        if body is None:
            return await _target_page(request, session, target_id, flash="unchanged")
        await _call(serving.patch_target, target_id, body, session.key_id)
    except forms.FormInvalid as exc:
        return await _target_page(request, session, target_id, 422, errors=exc.messages)
    except LetheError as exc:
        if exc.status == 404:
            raise
        return await _target_page(request, session, target_id, int(exc.status), errors=[exc.message])
    return _see_other(f"{sessions.PATH}/targets/{target_id}?done=saved")


@router.get("/targets/{target_id}/delete")
async def confirm_delete(request: Request, target_id: str) -> Response:
    session = await _session(request)
    target = await _call(_serving(request).get_target, target_id)
    return _page(request, "delete.html", session, target=target)


@router.post("/targets/{target_id}/delete")
async def delete(request: Request, target_id: str) -> Response:
    session = await _session(request)
    await _form(request, session)
    await _call(_serving(request).delete_target, target_id, session.key_id)
    return _see_other(f"{sessions.PATH}/tombstones?{urlencode({'target_id': target_id})}")


@router.get("/targets/{target_id}/report")
async def report(request: Request, target_id: str) -> Response:
    session = await _session(request)
    data = (await _call(_serving(request).report, target_id, False)).model_dump(mode="json")
    job = data["verification_job"]
    running = job is not None and job["status"] in ("queued", "running")
    return _page(request, "report.html", session, report=data, plots=await _call(report_plots, data),
                 refresh=REFRESH_S if running else None, flash=request.query_params.get("done"))


@router.post("/targets/{target_id}/verify")
async def verify(request: Request, target_id: str) -> Response:
    session = await _session(request)
    await _form(request, session)
    await _call(_serving(request).verify, target_id, session.key_id)
    return _see_other(f"{sessions.PATH}/targets/{target_id}/report?done=verification-queued")


# ---- records ---------------------------------------------------------------------------------------------------


def _filters(request: Request, listing: str) -> dict[str, str]:
    return {name: value for name in LISTING_FILTERS[listing] if (value := request.query_params.get(name, "").strip())}


async def _records(request: Request, listing: str) -> Response:
    """A page of the admin trail or the tombstones: the REST listing's own filters and cursor, validated alike."""
    session = await _session(request)
    filters = _filters(request, listing)
    cursor = request.query_params.get("cursor") or None
    try:
        query = forms.ListingQuery.model_validate({**filters, "cursor": cursor})
        conditions = (ActionFilter(**query.filters(LISTING_FILTERS[listing])) if listing == "actions"
                      else TombstoneFilter(**query.filters(LISTING_FILTERS[listing])))
        page = await _call(getattr(_serving(request), listing), conditions, PAGE, query.cursor)
    except ValidationError as exc:
        return _page(request, f"{listing}.html", session, 422, rows=[], filters=filters, next_page=None,
                     errors=forms.validation_messages(exc), actions=ACTIONS, legal_bases=LEGAL_BASES)
    except LetheError as exc:
        return _page(request, f"{listing}.html", session, int(exc.status), rows=[], filters=filters, next_page=None,
                     errors=[exc.message], actions=ACTIONS, legal_bases=LEGAL_BASES)
    next_page = f"?{urlencode({**filters, 'cursor': page.next_cursor})}" if page.next_cursor else None
    return _page(request, f"{listing}.html", session, rows=page.data, filters=filters, next_page=next_page,
                 actions=ACTIONS, legal_bases=LEGAL_BASES)


@router.get("/actions")
async def actions(request: Request) -> Response:
    return await _records(request, "actions")


@router.get("/tombstones")
async def tombstones(request: Request) -> Response:
    return await _records(request, "tombstones")


# ---- wiring ----------------------------------------------------------------------------------------------------


def install_console(app: FastAPI) -> None:
    """Serve the console on ``app``: its routes and how its errors become pages."""
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _: LoginRequired) -> Response:
        if request.method == "GET" and request.cookies.get(sessions.COOKIE) is None:
            return _see_other(f"{sessions.PATH}/login")
        response = _see_other(f"{sessions.PATH}/login?message=expired")
        sessions.clear_cookie(response, request, sessions.COOKIE)
        return response


def console_error_page(request: Request, error: LetheError) -> HTMLResponse | None:
    """A console request's API error as a page (the REST error shape's message and status); None off the console."""
    if not request.url.path.startswith(sessions.PATH):
        return None
    return _page(request, "error.html", None, int(error.status), errors=[error.message], code=error.code)

