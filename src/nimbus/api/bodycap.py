"""The control plane's body cap: nothing beyond it is read, parsed or spooled.

FastAPI parses a multipart upload into temporary files as it arrives, before any
route can look at its size. :func:`capped` sits in front: a declared
``Content-Length`` over the cap is refused before a byte is read, and a body that
grows past it (chunked, or lying about its length) is cut off there: the client gets
``413`` and the app reads a disconnect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from nimbus.errors import RequestTooLarge
from nimbus.gateway.app import declared_length
from nimbus.packaging.zips import human_size

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def _send_413(send: Any, message: str) -> None:
    body = orjson.dumps(RequestTooLarge(message).to_wire())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def capped(
    app: App, scope: dict[str, Any], receive: Any, send: Any, limit: int, what: str
) -> None:
    """Run ``app`` with a request body of at most ``limit`` bytes (``what``: the
    limits a person should read about, e.g. ``"code zips up to 50 MB"``)."""
    declared = declared_length(scope["headers"])
    if declared is not None and declared > limit:
        await _send_413(send, f"the request body is {human_size(declared)}, over {what}")
        return
    seen = 0
    over = started = False

    async def receive_capped() -> Any:
        nonlocal seen, over
        message = await receive()
        if message["type"] == "http.request" and not over:
            seen += len(message.get("body", b""))
            if seen > limit:
                over = True
                if not started:
                    await _send_413(send, f"the request body is over {what}")
                return {"type": "http.disconnect"}
        return {"type": "http.disconnect"} if over else message

    async def send_unless_over(message: Any) -> None:
        nonlocal started
        if over:
            return
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive_capped, send_unless_over)
    except Exception:
        if not over:  # the app's own failure: its error handling stays as it is
            raise
