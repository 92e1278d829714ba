"""The gateway: a bare ASGI app for ``/function/{name}[/{path}]``, the hot path.

No framework routing, no middleware: one prefix split, the body read with its
cap, the event built (:mod:`nimbus.gateway.events`), one call to the
:class:`~nimbus.invoke.Invoker`, and the result mapped back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import MutableMapping
from typing import Any

import orjson

from nimbus.errors import NimbusError, RequestTooLarge, ResourceNotFound, headers_of, status_of
from nimbus.gateway.events import build_event, build_response
from nimbus.invoke import Invoker

PREFIX = "/function/"
JSON = (b"content-type", b"application/json")
Scope = MutableMapping[str, Any]


class Gateway:
    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        rid = uuid.uuid4()
        rid_header = (b"x-nimbus-request-id", str(rid).encode())
        try:
            name, _, rest = scope["path"][len(PREFIX) :].partition("/")
            if not name:
                raise ResourceNotFound("no function named in the path: use /function/{name}")
            body = await read_body(scope, receive, self._invoker.max_payload)
            event = build_event(scope, body, "/" + rest, str(rid), time.time())
            result = await self._invoker.invoke(name, event, request_id=rid)
        except NimbusError as e:
            headers = [JSON, rid_header]
            headers.extend((k.encode(), v.encode()) for k, v in headers_of(e).items())
            await send_response(send, status_of(e), headers, orjson.dumps(e.to_wire()))
            return
        if result.error is None:
            response = build_response(result.body)
            headers = response.headers
            headers.append(rid_header)
            await send_response(send, response.status, headers, response.body)
        else:
            status = 504 if result.error == "Timeout" else 502
            await send_response(
                send,
                status,
                [JSON, rid_header, (b"x-nimbus-function-error", result.error.encode())],
                result.body,
            )


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = 0
            if declared > limit:
                raise RequestTooLarge(f"payload is {declared} bytes; the limit is {limit} bytes")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            break
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"payload is over the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_response(
    send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """One complete ASGI response, with its length (not chunked)."""
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
