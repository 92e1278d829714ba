"""OpenFaaS's asynchronous route: ``ANY /async-function/{name}[/{path}]``.

The request becomes the same payload 2.0 event the synchronous gateway builds
(:func:`~nimbus.gateway.events.build_event`), is stored durably by
:meth:`~nimbus.asyncinvoke.AsyncInvoker.submit`, and is answered ``202`` with
``X-Nimbus-Invocation-Id`` (and OpenFaaS's ``X-Call-Id``, the same id). An
``X-Callback-Url`` is called with the result once the invocation finishes; an
``Idempotency-Key`` makes a repeated request return the first invocation.
Unknown function → 404 and payload over the async limit → 413, before anything
is stored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from nimbus.asyncinvoke import AsyncInvoker, check_callback_url, check_idempotency_key
from nimbus.auth.edge import require_scope
from nimbus.errors import (
    InvalidParameterValue,
    NimbusError,
    ResourceNotFound,
    headers_of,
    status_of,
)
from nimbus.gateway.app import JSON, Authorize, Scope, anyone, read_body, send_response
from nimbus.gateway.events import build_event
from nimbus.queue import Invocation

ASYNC_PREFIX = "/async-function/"


INVOKE_PREFIX = "/v1/functions/"
INVOKE_SUFFIX = "/invoke"


def json_event(body: bytes) -> bytes:
    """A direct invoke's body as the event: JSON, or ``{}`` when empty."""
    if not body.strip():
        return b"{}"
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidParameterValue("the event must be JSON") from None
    return body


async def accept_event(
    async_invoker: AsyncInvoker,
    name: str,
    headers: Mapping[str, str],
    read: Callable[[int], Awaitable[bytes]],
) -> tuple[Invocation, bool]:
    """``POST /v1/functions/{name}/invoke`` with ``X-Nimbus-Invocation-Type: Event``: check
    the headers, read the body (``read(limit)``), store the invocation.

    Shared by the API route and the bare fast path below, so both answer alike.
    """
    async_invoker.function(name)  # 404 before reading a body
    key = check_idempotency_key(headers.get("idempotency-key"))
    callback = check_callback_url(headers.get("x-callback-url"), async_invoker.outbound)
    body = json_event(await read(async_invoker.max_payload))
    return await async_invoker.submit(
        name,
        body,
        idempotency_key=key,
        source="api",
        headers={"x-callback-url": callback} if callback else None,
    )


def is_event_invoke(scope: Scope) -> bool:
    """Whether a request is ``POST /v1/functions/{name}/invoke`` of type ``Event``."""
    path: str = scope["path"]
    if scope["method"] != "POST" or not (
        path.startswith(INVOKE_PREFIX) and path.endswith(INVOKE_SUFFIX)
    ):
        return False
    for header, value in scope["headers"]:
        if header in (b"x-nimbus-invocation-type", b"x-amz-invocation-type"):
            return bool(value.lower() == b"event")
    return False


class AsyncGateway:
    def __init__(self, async_invoker: AsyncInvoker, *, authorize: Authorize = anyone) -> None:
        self._async = async_invoker
        self._authorize = authorize

    async def invoke_event(self, scope: Scope, receive: Any, send: Any) -> None:
        """The fast path for Event invokes (see :func:`is_event_invoke`): what the API route
        does, without the framework's routing and middleware (the enqueue rate doubles)."""
        name = scope["path"][len(INVOKE_PREFIX) : -len(INVOKE_SUFFIX)]
        try:
            if not name or "/" in name:
                raise ResourceNotFound("no such route")
            require_scope(scope, "invoke")  # the edge authenticated it; the route's scope
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            invocation, created = await accept_event(
                self._async, name, headers, lambda limit: read_body(scope, receive, limit)
            )
        except NimbusError as e:
            headers_out = [JSON]
            headers_out.extend((k.encode(), v.encode()) for k, v in headers_of(e).items())
            await send_response(send, status_of(e), headers_out, orjson.dumps(e.to_wire()))
            return
        out = [JSON, (b"x-nimbus-invocation-id", invocation.id.encode())]
        if not created:
            out.append((b"x-nimbus-idempotent-replay", b"true"))
        await send_response(send, 202, out, orjson.dumps({"invocation_id": invocation.id}))

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        rid = uuid.uuid4()
        rid_header = (b"x-nimbus-request-id", str(rid).encode())
        try:
            name, _, rest = scope["path"][len(ASYNC_PREFIX) :].partition("/")
            if not name:
                raise ResourceNotFound("no function named in the path: use /async-function/{name}")
            self._async.function(name)  # 404 before reading a body
            self._authorize(name, scope["headers"])
            callback = key = None
            for header, value in scope["headers"]:
                if header == b"x-callback-url":
                    callback = value.decode("latin-1")
                elif header == b"idempotency-key":
                    key = value.decode("latin-1")
            check_callback_url(callback, self._async.outbound)
            check_idempotency_key(key)
            body = await read_body(scope, receive, self._async.max_payload)
            event = build_event(scope, body, "/" + rest, str(rid), time.time())
            invocation, created = await self._async.submit(
                name,
                event,
                idempotency_key=key,
                source="gateway",
                headers={"x-callback-url": callback} if callback else None,
            )
        except NimbusError as e:
            headers = [JSON, rid_header]
            headers.extend((k.encode(), v.encode()) for k, v in headers_of(e).items())
            await send_response(send, status_of(e), headers, orjson.dumps(e.to_wire()))
            return
        ident = invocation.id.encode()
        headers = [
            JSON,
            rid_header,
            (b"x-nimbus-invocation-id", ident),
            (b"x-call-id", ident),
        ]
        if not created:
            headers.append((b"x-nimbus-idempotent-replay", b"true"))
        await send_response(send, 202, headers, orjson.dumps({"invocation_id": invocation.id}))
