"""The console's login session: a random token in an HttpOnly, SameSite=Strict cookie, kept server-side.

The cookie holds a random token whose SHA-256 the registry stores with the admin key id it was opened with, its CSRF
token and its expiry (``LETHE_CONSOLE_SESSION_S``). Each request re-checks that the key is still valid (configured
in the environment, or a registry key not revoked), so revoking a key also ends its console sessions. ``Secure`` is
set when the request came over https (``LETHE_CONSOLE_SECURE_COOKIE``: ``auto``, ``always``, ``never``).
"""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from server.registry.console_sessions import ConsoleSession

COOKIE = "lethe_console"
LOGIN_COOKIE = "lethe_console_login"  # the login form's CSRF token (double submit)
PATH = "/admin/ui"
LOGIN_FORM_S = 3600


def secure_cookie(request: Request) -> bool:
    mode = request.app.state.settings.console_secure_cookie
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict",
                        secure=secure_cookie(request))


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path=PATH, httponly=True, samesite="strict", secure=secure_cookie(request))


def key_still_valid(request: Request, key_id: str) -> bool:
    """Whether the admin key a session was opened with still opens the admin API."""
    if key_id in request.app.state.settings.environment_admin_keys:
        return True
    return request.app.state.admin.admin_key_active(key_id)


def current_session(request: Request) -> ConsoleSession | None:
    """The request's unexpired session whose key is still valid, or None. Blocking (a database read)."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    session = request.app.state.admin.console_session(token)
    if session is None or not key_still_valid(request, session.key_id):
        return None
    return session
