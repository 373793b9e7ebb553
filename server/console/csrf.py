"""CSRF tokens of the console's forms.

Every form carries a hidden ``csrf`` field, checked on every POST: a signed-in session's forms carry the session's
own token (stored with it, ``server/registry/console_sessions.py``); the login form, which has no session yet, a
random token also set in a short-lived cookie (double submit). The cookies are ``SameSite=Strict`` as well, so a
cross-site form post arrives without them; the token is the second, independent check.
"""

from __future__ import annotations

import hmac
import secrets
from http import HTTPStatus

from server.errors import LetheError

FIELD = "csrf"


class CsrfFailed(LetheError):
    """A form posted without the token of the session (or login form) it came from."""

    status = HTTPStatus.FORBIDDEN
    type = "permission_error"

    def __init__(self) -> None:
        super().__init__("This form has expired or did not come from this console: reload the page and try again.",
                         code="csrf_failed")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check(expected: str | None, submitted: object) -> None:
    """Raise ``CsrfFailed`` unless ``submitted`` is the ``expected`` token (compared in constant time)."""
    if not expected or not isinstance(submitted, str) or not hmac.compare_digest(expected.encode(), submitted.encode()):
        raise CsrfFailed()
