"""One bearer-key check for both surfaces: inference keys (``LETHE_API_KEYS``) and the admin key."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request


def has_bearer_key(request: Request, keys: Sequence[str]) -> bool:
    """True when the request's ``Authorization: Bearer`` token is one of ``keys``.

    Each comparison is constant-time, so response timing does not tell a caller how much of a key it guessed right.
    """
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)
