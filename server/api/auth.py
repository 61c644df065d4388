"""Who may connect: the API key (constant-time compare) and, for websockets, the page's Origin.

The key is read from, in this order: `Authorization: Bearer <key>` (any client that can set headers); the websocket
subprotocol `ca2vdm.key.<base64url(key)>`, offered beside `ca2vdm` (browsers cannot set headers on a websocket, and
a subprotocol, unlike a URL, is not logged or kept in history); the `api_key` query parameter (kept for old clients;
redacted from the logs).

Origins: a browser page may open a websocket to any server it can reach, the user's loopback included, and sends
its Origin. Allowed: no Origin (not a browser), the server's own origin, loopback pages, and `allowed_origins`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from .settings import Settings

SUBPROTOCOL = "ca2vdm"
_KEY_PREFIX = "ca2vdm.key."
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")


def _matches(settings: Settings, given: str | None) -> bool:
    assert settings.api_key is not None
    return given is not None and hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode())


def key_fingerprint(settings: Settings) -> str | None:
    """Who a session belongs to, for resuming it: a hash of the API key (None when no key is configured). A resume
    token only works with the key it was issued under, so a rotated key also retires the old tokens."""
    if settings.api_key is None:
        return None
    return hashlib.sha256(b"ca2vdm-resume:" + settings.api_key.get_secret_value().encode()).hexdigest()[:32]


def bearer(headers: Headers) -> str | None:
    value = headers.get("authorization")
    return value[7:].strip() if value and value.lower().startswith("bearer ") else None


def subprotocol_key(headers: Headers) -> str | None:
    for proto in (p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")):
        if proto.startswith(_KEY_PREFIX):
            encoded = proto[len(_KEY_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, ValueError):
                return None
    return None


def key_is_valid(settings: Settings, headers: Headers, query_key: str | None, websocket: bool = False) -> bool:
    if settings.api_key is None:
        return True
    candidates = [bearer(headers), subprotocol_key(headers) if websocket else None, query_key]
    return any(_matches(settings, c) for c in candidates if c is not None)


def offered_subprotocol(headers: Headers) -> str | None:
    """`ca2vdm` if the client offered it (the server then accepts with it, as the websocket handshake requires)."""
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def origin_allowed(settings: Settings, headers: Headers) -> bool:
    origin = headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname in _LOOPBACK or origin in settings.allowed_origins:
        return True
    host = headers.get("host")
    return host is not None and parts.netloc.lower() == host.lower()
