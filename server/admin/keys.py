"""Admin keys: which key an admin request used, as the key id the admin trail records.

Two kinds, both accepted everywhere in ``/admin/v1``:

- **Environment keys**: ``LETHE_ADMIN_KEY`` (key id ``admin``) and ``LETHE_ADMIN_KEYS`` (``id:key,…``). They exist
  while the process is configured with them, so changing one means a restart of every replica: the bootstrap and
  break-glass keys, kept in the deployment's secret store. They are compared in constant time, in memory.
- **Registry keys**: created over the admin API (``lethe admin-keys create ID``), shown once, stored as their SHA-256
  only (``server/registry/admin_keys.py``), and revocable. Every request with one looks its digest up, so a
  revocation holds on every replica from its commit on, with no cache to expire. A lookup happens only for a token
  shaped like a registry key (``KEY_PREFIX``, fixed length): random junk costs no query.

The admin API is enabled when the environment configures at least one key: registry keys are created by an admin,
so without an environment key there would be no one to create the first one, nor to revoke a leaked one.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping

from server.auth import matching_key

KEY_PREFIX = "lethe_ak_"
KEY_BYTES = 32
KEY_CHARS = len(KEY_PREFIX) + len(secrets.token_urlsafe(KEY_BYTES))
ENVIRONMENT = "environment"


def new_key() -> str:
    """A fresh registry key: 256 random bits, with a prefix that tells it (and secret scanners) what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def digest(key: str) -> str:
    """What the registry stores of a key: its SHA-256, hex (enough for 256 random bits: see the registry's store)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_holder(token: str | None, environment: Mapping[str, str],
               registry_holder: Callable[[str], str | None] | None) -> str | None:
    """The id of the admin key ``token`` is (an environment key, else an unrevoked registry key), or None."""
    found = matching_key(token, environment)
    if found is not None:
        return found
    if registry_holder is None or token is None or not token.startswith(KEY_PREFIX) or len(token) != KEY_CHARS:
        return None
    return registry_holder(digest(token))
