"""What every request passes before a route sees it (one ASGI middleware).

- **Token.** With a token (``--token``, or the one generated when the server listens beyond
  loopback), every data route needs the header ``X-Wsiseg-Token: <token>``; without it the
  answer is 401. The page shells (``/``, ``/view/<id>``, ``/static/...``) and
  ``/openapi.json`` hold no slide data and are open; the page reads the token from the URL
  fragment (never sent to the server) and sends the header itself.
- **Host.** Bound to loopback, the ``Host`` header must name loopback too: a web page that
  re-points its own domain at 127.0.0.1 (DNS rebinding) is refused with 403.
- **Cross-site posts.** A POST (a round, an undo) must say it carries JSON (or a gzip/zip
  QuPath export); the content types a browser may send cross-site without asking (forms,
  ``text/plain``, none) are refused with 415, so another site's page cannot post.
- **Body size.** A body over ``max_body_bytes`` is refused with 413, by its
  ``Content-Length`` or while it streams.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

TOKEN_HEADER = "x-wsiseg-token"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
OPEN_PREFIXES = ("/static/", "/view/")
OPEN_PATHS = {"/", "/openapi.json", "/favicon.ico"}
# What browsers send cross-origin without a preflight: never accepted as a POST body.
SIMPLE_TYPES = {"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard:
    """ASGI middleware enforcing the rules of the module docstring."""

    def __init__(self, app: ASGIApp, *, token: str | None, loopback_only: bool,
                 max_body_bytes: int):
        self.app = app
        self.token = token
        self.loopback_only = loopback_only
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        refusal = self._refusal(scope, headers, path)
        if refusal is not None:
            await _answer(send, *refusal)
            return
        await self.app(scope, self._limited(receive, send), send)

    def _refusal(self, scope: Scope, headers: dict[str, str], path: str) -> tuple[int, str] | None:
        if self.loopback_only:
            host = _host_name(headers.get("host", ""))
            if not is_loopback(host):
                return 403, f"host {host!r} refused: this server answers loopback names only"
        if self.token is not None and not _is_open(path):
            given = headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, f"missing or wrong token: send the header {TOKEN_HEADER}"
        if scope.get("method") == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media in SIMPLE_TYPES:
                return 415, ("a POST needs Content-Type application/geo+json or "
                             "application/json (a QuPath export; {} for undo)")
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return 400, "Content-Length is not a number"
            if too_big:
                return 413, f"request body over {self.max_body_bytes} bytes"
        return None

    def _limited(self, receive: Receive, send: Send) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return wrapped


class BodyTooLarge(Exception):
    """A streamed body passed the limit (turned into a 413 by the app's handler)."""

    def __init__(self, limit: int):
        super().__init__(f"request body over {limit} bytes")


def _host_name(value: str) -> str:
    """The name of a ``Host`` header without its port (``[::1]:8765`` → ``[::1]``)."""
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0]


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _answer(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"detail": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
