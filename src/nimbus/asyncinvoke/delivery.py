"""POSTs to HTTP destinations and ``X-Callback-Url``s: in the background, a few retries.

A delivery never holds up a worker and never fails one: after
:data:`DELIVERY_ATTEMPTS` tries (on transport errors, 429 and 5xx; a 10 s timeout
each) it is logged and dropped. Deliveries run after the invocation's outcome is
committed, so a crash in between loses them: at most once. Each goes only to a
public address (:mod:`nimbus.outbound`), checked when it is sent and connected to
as checked; one that is refused is logged and not retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nimbus.outbound import OutboundPolicy, OutboundRefused
from nimbus.queue import backoff

log = logging.getLogger("nimbus.async")

#: POST ``body`` to ``url`` with ``headers``; return the HTTP status (raise on transport errors).
Poster = Callable[[str, bytes, Mapping[str, str]], Awaitable[int]]

#: Tries per delivery, and the timeout of each (seconds).
DELIVERY_ATTEMPTS = 4
DELIVERY_TIMEOUT = 10.0


class Deliveries:
    """Background POSTs. ``post`` replaces the HTTP client (tests pass a fake)."""

    def __init__(self, post: Poster | None = None, policy: OutboundPolicy | None = None) -> None:
        self._post = post
        self._policy = policy or OutboundPolicy()
        self._http: Any = None  # an httpx.AsyncClient, made by open() when no poster is given
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        if self._post is None and self._http is None:
            import httpx

            self._http = httpx.AsyncClient(
                timeout=DELIVERY_TIMEOUT,
                follow_redirects=False,
                headers={"user-agent": "nimbus-async"},
            )

    def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        """POST in the background (retried, then logged)."""
        self.spawn(self._deliver(url, body, dict(headers)))

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` in the background until done or :meth:`close`."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> Sequence[asyncio.Task[None]]:
        return list(self._tasks)

    async def close(self, grace: float) -> None:
        """Give deliveries in flight ``grace`` seconds, then drop the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _deliver(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        problem = ""
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            try:
                status = await self._post_once(url, body, headers)
            except OutboundRefused as e:
                log.warning("POST %s refused: %s", url, e.message)
                return
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if status < 500 and status != 429:
                    if status >= 400:
                        log.warning("POST %s answered %d; not retried", url, status)
                    return
                problem = f"HTTP {status}"
            if attempt < DELIVERY_ATTEMPTS:
                await asyncio.sleep(backoff(attempt, base=0.5, factor=2.0, cap=5.0))
        log.warning("POST %s failed %d times, giving up: %s", url, DELIVERY_ATTEMPTS, problem)

    async def _post_once(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        if self._post is not None:
            return await self._post(url, body, headers)
        if self._http is None:
            raise RuntimeError("deliveries are closed")
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        # Connect to the address that was checked, not to whatever the name resolves to
        # next (DNS rebinding); the name goes in Host and TLS's server name.
        address = await self._policy.resolve(host, port)
        netloc = f"[{address}]" if ":" in address else address
        if parts.port is not None:
            netloc += f":{parts.port}"
        target = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        sent = {**headers, "host": host if parts.port is None else f"{host}:{parts.port}"}
        response = await self._http.post(
            target, content=body, headers=sent, extensions={"sni_hostname": host}
        )
        return int(response.status_code)
