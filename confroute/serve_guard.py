"""Request-body guard of the routing server: size and JSON-nesting bounds, quiet disconnects.

A pure ASGI middleware (no framework imports) placed in front of the app by
:func:`confroute.serve.create_app`. It reads the whole body of each request
before the app sees it and answers, with an OpenAI-style error and without
calling the app:

- ``413`` (``code="body_too_large"``) when the body is larger than
  ``max_body_bytes`` (from ``Content-Length`` before reading anything, else
  while reading);
- ``400`` (``code="too_deeply_nested"``) when the JSON nests arrays and objects
  deeper than ``max_json_depth`` (a deeply nested body would otherwise exhaust
  the JSON parser's recursion and fail as a 500).

A client that disconnects before its body is complete is dropped silently: no
response, no traceback in the log (it is counted at DEBUG level only).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from confroute._validation import check_int

__all__ = ["BodyGuard", "guard_options", "json_depth", "with_guard"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes, limit: int) -> int:
    """Nesting depth of the arrays and objects of a JSON text, counted up to ``limit + 1``.

    Brackets inside strings are ignored. The text is not parsed, so this is
    safe (linear time, no recursion) on any input, valid JSON or not.

    Parameters
    ----------
    body : bytes
        The JSON text.
    limit : int
        Counting stops as soon as the depth exceeds ``limit``.

    Returns
    -------
    int
        The largest depth reached, or ``limit + 1`` if it exceeds ``limit``.
    """
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return limit + 1
        else:
            depth = max(depth - 1, 0)
    return deepest


class _Disconnected(Exception):
    """The client went away before its body was complete."""


class BodyGuard:
    """ASGI middleware bounding request bodies (see the module docstring).

    Parameters
    ----------
    app : ASGI application
    max_body_bytes : int
        Largest body accepted, in bytes.
    max_json_depth : int
        Deepest nesting of JSON arrays and objects accepted.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_depth: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(send)
            return
        try:
            body = await self._read(receive)
        except _Disconnected:
            logger.debug("client disconnected before sending its whole body")
            return
        if body is None:
            await self._too_large(send)
            return
        if json_depth(body, self.max_json_depth) > self.max_json_depth:
            await _reply(send, 400, f"The request body nests JSON arrays and objects deeper "
                         f"than {self.max_json_depth} levels.", "too_deeply_nested")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the bound."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        await _reply(send, 413, f"The request body is larger than the server's limit of "
                     f"{self.max_body_bytes} bytes.", "body_too_large")


def guard_options(max_body_bytes: Any, max_json_depth: Any, owner: str) -> dict[str, int]:
    """Checked :class:`BodyGuard` options.

    ``max_body_bytes`` must be an int in [1, 2**31], ``max_json_depth`` an int in
    [2, 1000] (the JSON parser itself recurses; 1000 stays well below its limit).
    """
    return {
        "max_body_bytes": check_int(max_body_bytes, "max_body_bytes", owner, min_value=1,
                                    max_value=1 << 31),
        "max_json_depth": check_int(max_json_depth, "max_json_depth", owner, min_value=2,
                                    max_value=1000),
    }


def with_guard(app: Any, max_body_bytes: Any, max_json_depth: Any, owner: str) -> Any:
    """``app`` (a Starlette/FastAPI app) with a :class:`BodyGuard` in front; returns it.

    The bounds are checked first (see :func:`guard_options`); ``owner`` is named
    in the error.
    """
    app.add_middleware(BodyGuard, **guard_options(max_body_bytes, max_json_depth, owner))
    return app


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then waits on the client."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                    "param": None, "code": code}}).encode("utf-8")
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": payload})
