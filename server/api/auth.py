"""API-key check (constant time). Accepted as `Authorization: Bearer <key>` or, for browsers, `?api_key=`."""

from __future__ import annotations

import hmac

from .settings import Settings


def key_is_valid(settings: Settings, authorization: str | None, query_key: str | None) -> bool:
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    given = None
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    elif query_key:
        given = query_key
    return given is not None and hmac.compare_digest(given.encode(), expected)
