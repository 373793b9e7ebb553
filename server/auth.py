"""One bearer-key check for both surfaces: inference keys (``LETHE_API_KEYS``) and the admin keys."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from fastapi import Request


def bearer_token(request: Request) -> str | None:
    """The request's ``Authorization: Bearer`` token, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


def matching_key(token: str | None, keys: Mapping[str, str]) -> str | None:
    """The name of the key in ``keys`` (name -> key) that ``token`` is, or None.

    Every key is compared, each in constant time, so response timing tells a caller neither how much of a key it
    guessed right nor which key it came close to.
    """
    if token is None:
        return None
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(token.encode(), key.encode()):
            found = found or name
    return found


def has_bearer_key(request: Request, keys: Sequence[str]) -> bool:
    """True when the request's ``Authorization: Bearer`` token is one of ``keys``."""
    return matching_key(bearer_token(request), {str(index): key for index, key in enumerate(keys)}) is not None
