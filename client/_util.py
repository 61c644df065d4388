"""URL normalisation, auth headers and image encoding shared by the clients."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

_HTTP = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WS = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
STREAM_PATH = "/v1/stream"


def _split(url: str) -> tuple[str, str, str]:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _HTTP or not parts.netloc:
        raise ValueError(f"not a server URL (want http[s]:// or ws[s]://host:port): {url!r}")
    return scheme, parts.netloc, parts.path.rstrip("/")


def http_base(url: str) -> str:
    """`http[s]://host:port[/prefix]` for an http, ws or bare `host:port` URL."""
    scheme, netloc, path = _split(url)
    if path.endswith(STREAM_PATH):
        path = path[: -len(STREAM_PATH)]
    return urlunsplit((_HTTP[scheme], netloc, path, "", ""))


def stream_url(url: str) -> str:
    """`ws[s]://host:port[/prefix]/v1/stream` for an http, ws or bare `host:port` URL."""
    scheme, netloc, path = _split(url)
    if not path.endswith(STREAM_PATH):
        path += STREAM_PATH
    return urlunsplit((_WS[scheme], netloc, path, "", ""))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def encode_image(image: bytes | str | Path) -> str:
    """Base64 of PNG/JPEG bytes, or of the file at a path."""
    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def open_part(path: Path) -> tuple[Path, IO[bytes]]:
    """A new hidden temp file beside `path` (normal permissions), to be renamed onto `path` when complete."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return tmp, open(tmp, "xb")
        except FileExistsError:
            continue
