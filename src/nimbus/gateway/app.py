"""The gateway: a bare ASGI app for the functions, the hot path.

Each function is served at ``/function/{name}[/{path}]`` and, like a Lambda function
URL, at the root of a host of its own (``<name>.<domain>``, routed on ``Host`` by
:func:`function_host`). No framework routing, no middleware: one prefix split, the
body read with its cap, the event built (:mod:`nimbus.gateway.events`), one call to
the :class:`~nimbus.invoke.Invoker`, and the result mapped back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import orjson

from nimbus.errors import (
    IncompleteRequest,
    NimbusError,
    RequestTooLarge,
    ResourceNotFound,
    headers_of,
    status_of,
)
from nimbus.gateway.events import build_event, build_response
from nimbus.invoke import Invoker, new_trace_id
from nimbus.models import InvokeContext

PREFIX = "/function/"
JSON = (b"content-type", b"application/json")
Scope = MutableMapping[str, Any]
#: What a client of a function URL sees when the function failed: nothing of the error.
_FAILED = orjson.dumps({"message": "Internal Server Error"})
_TIMED_OUT = orjson.dumps({"message": "Endpoint request timed out"})


#: Checks that a request may call a function (``name``, the request's ASGI headers);
#: raises a NimbusError (401, 403, 404) when it may not.
Authorize = Callable[[str, Iterable[tuple[bytes, bytes]]], None]


def anyone(_name: str, _headers: Iterable[tuple[bytes, bytes]]) -> None:
    return None


class Gateway:
    def __init__(self, invoker: Invoker, *, authorize: Authorize = anyone) -> None:
        self._invoker = invoker
        self._authorize = authorize

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """``/function/{name}[/{path}]``: the function, mounted under that prefix."""
        name, _, rest = scope["path"][len(PREFIX) :].partition("/")
        await self.serve(scope, receive, send, name, "/" + rest, PREFIX + name)

    async def serve(
        self, scope: Scope, receive: Any, send: Any, name: str, path: str, prefix: str = ""
    ) -> None:
        """Serve one request to function ``name`` at ``path`` inside it (``prefix``: where
        it is mounted; empty at the root of its own host)."""
        rid = uuid.uuid4()
        rid_header = (b"x-nimbus-request-id", str(rid).encode())
        try:
            if not name:
                raise ResourceNotFound("no function named in the path: use /function/{name}")
            self._authorize(name, scope["headers"])
            body = await read_body(scope, receive, self._invoker.max_payload)
            trace = trace_of(scope) or new_trace_id()
            event = build_event(
                scope, body, path, str(rid), time.time(), trace_id=trace, prefix=prefix
            )
            result = await self._invoker.invoke(
                name, event, request_id=rid, context=InvokeContext(trace_id=trace)
            )
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
            # As a Lambda function URL: the status and a generic body, never the error
            # (its message and stack trace are in the function's logs).
            timeout = result.error == "Timeout"
            await send_response(
                send,
                504 if timeout else 502,
                [JSON, rid_header, (b"x-nimbus-function-error", result.error.encode())],
                _TIMED_OUT if timeout else _FAILED,
            )


def trace_of(scope: Scope) -> str | None:
    """The caller's ``X-Amzn-Trace-Id``, when it is one (``Root=...``)."""
    for key, value in scope["headers"]:
        if key == b"x-amzn-trace-id":
            text = value.decode("latin-1").strip()
            return text if text.startswith("Root=") and len(text) <= 256 else None
    return None


def function_host(scope: Scope, suffix: bytes) -> str | None:
    """The function a request's ``Host`` names (``<name>.<domain>[:port]``, ``suffix``
    being ``b"." + domain``), or None."""
    for key, value in scope["headers"]:
        if key == b"host":
            host = value.rpartition(b":")[0] if value[-1:].isdigit() else value
            host = host.lower().rstrip(b".")
            if host.endswith(suffix):
                label = host[: -len(suffix)]
                if label and b"." not in label:
                    return str(label.decode("ascii", "replace"))
            return None
    return None


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The request's ``Content-Length``, or None (absent, or not a number)."""
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all.

    A body cut short (the client closed the connection, or the listener timed it out)
    is :class:`IncompleteRequest`, never a shorter body.
    """
    declared = declared_length(scope["headers"]) or 0
    if declared > limit:
        raise RequestTooLarge(f"payload is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise IncompleteRequest(f"the request ended after {size} bytes of its body")
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
