"""The async invoker's logic: the pure decision, destination records, and the workers
driven round by round against a ``MemoryQueue``, a fake invoke path and a synthetic
clock. The same behaviour against a real server is in tests/e2e/test_async.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import pytest

from nimbus.asyncinvoke import (
    AGE_EXCEEDED,
    AsyncInvoker,
    GiveUp,
    Retry,
    Succeed,
    check_callback_url,
    check_idempotency_key,
    decide,
    destination_record,
    expired,
    function_cap,
    lease_length,
)
from nimbus.errors import (
    InvalidParameterValue,
    RequestTooLarge,
    ResourceConflict,
    ResourceNotFound,
    ServiceException,
    TooManyRequests,
)
from nimbus.models import AsyncSpec, FunctionRecord, InvokeResult, Version, parse_spec
from nimbus.outbound import OutboundPolicy
from nimbus.queue import Invocation, MemoryQueue

HALF = 0.5  # rand() that makes backoff() exact: no jitter


# ------------------------------------------------------------------------- decide()


def test_success() -> None:
    d = decide(
        outcome="succeeded",
        attempt=1,
        function_errors=0,
        created_at=0,
        config=AsyncSpec(),
        now=1,
    )
    assert d == Succeed()


def test_function_errors_are_retried_with_backoff_until_max_retries() -> None:
    config = AsyncSpec(max_retries=2, backoff_base=1.0, backoff_factor=2.0)

    def after(attempt: int, errors: int, now: float) -> Any:
        return decide(
            outcome="Unhandled",
            attempt=attempt,
            function_errors=errors,
            created_at=0,
            config=config,
            now=now,
            rand=lambda: HALF,
        )

    assert after(1, 0, 10) == Retry(not_before=11, function_error=True)
    assert after(2, 1, 20) == Retry(not_before=22, function_error=True)
    assert after(3, 2, 30) == GiveUp(dead_letter=True, condition="RetriesExhausted")
    for kind in ("Timeout", "Crash", "Init", "OutOfMemory"):
        d = decide(outcome=kind, attempt=1, function_errors=2, created_at=0, config=config, now=1)
        assert d == GiveUp(dead_letter=True, condition="RetriesExhausted")


def test_max_retries_zero_gives_up_on_the_first_error() -> None:
    d = decide(
        outcome="Unhandled",
        attempt=1,
        function_errors=0,
        created_at=0,
        config=AsyncSpec(max_retries=0),
        now=1,
    )
    assert d == GiveUp(dead_letter=True, condition="RetriesExhausted")


def test_throttling_and_platform_errors_do_not_count_and_run_until_the_age() -> None:
    config = AsyncSpec(max_retries=0, max_event_age=60, backoff_base=1, backoff_factor=2)
    for outcome in ("Throttled", "ServiceError", "Interrupted", "LeaseExpired"):
        d = decide(
            outcome=outcome,
            attempt=5,
            function_errors=0,
            created_at=0,
            config=config,
            now=10,
            rand=lambda: HALF,
        )
        assert d == Retry(not_before=10 + 16, function_error=False), outcome
    # The next attempt would come after max_event_age: give up now.
    d = decide(
        outcome="Throttled",
        attempt=5,
        function_errors=0,
        created_at=0,
        config=config,
        now=50,
        rand=lambda: HALF,
    )
    assert d == GiveUp(dead_letter=True, condition="EventAgeExceeded")


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    config = AsyncSpec(backoff_base=0.5, backoff_factor=3, backoff_max=10)

    def delay(attempt: int, rand: float) -> float:
        d = decide(
            outcome="Throttled",
            attempt=attempt,
            function_errors=0,
            created_at=0,
            config=config,
            now=100,
            rand=lambda: rand,
        )
        assert isinstance(d, Retry)
        return d.not_before - 100

    assert [delay(n, HALF) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.5, 1.5, 4.5, 10, 10])
    assert delay(1, 0.0) == pytest.approx(0.45)  # -10 %
    assert delay(1, 0.999999) == pytest.approx(0.55, abs=1e-5)  # +10 %
    assert delay(9, 0.999999) == 10  # never above the cap


def test_deleted_function_fails_without_dead_letter_and_too_large_dead_letters() -> None:
    config = AsyncSpec()
    d = decide(
        outcome="ResourceNotFound", attempt=1, function_errors=0, created_at=0, config=config, now=1
    )
    assert d == GiveUp(dead_letter=False, condition=None)
    d = decide(
        outcome="RequestTooLarge", attempt=1, function_errors=0, created_at=0, config=config, now=1
    )
    assert d == GiveUp(dead_letter=True, condition="RetriesExhausted")


def test_expired() -> None:
    config = AsyncSpec(max_event_age=60)
    assert not expired(100, config, 159.9)
    assert expired(100, config, 160)


def test_caps_and_lease_length() -> None:
    spec = parse_spec({"name": "f", "scaling": {"max": 10}, "timeout": 3})
    assert function_cap(spec) == 5
    assert function_cap(parse_spec({"name": "f", "scaling": {"max": 1}})) == 1
    assert function_cap(parse_spec({"name": "f", "async": {"max_concurrency": 3}})) == 3
    # Never more than the function may have instances.
    spec2 = parse_spec({"name": "f", "scaling": {"max": 2}, "async": {"max_concurrency": 9}})
    assert function_cap(spec2) == 2
    assert lease_length(spec, 10) == 6 * 3 + 10


def test_header_checks() -> None:
    assert check_idempotency_key(None) is None
    assert check_idempotency_key("order-42") == "order-42"
    for bad in ("", "x" * 257, "tab\there", "é"):
        with pytest.raises(InvalidParameterValue):
            check_idempotency_key(bad)
    assert check_callback_url("https://hooks.example.com/cb") == "https://hooks.example.com/cb"
    loopback = OutboundPolicy.parse("127.0.0.1/32")
    assert check_callback_url("http://127.0.0.1:9/cb", loopback) == "http://127.0.0.1:9/cb"
    for bad in ("ftp://x/y", "/relative", "http://", "http://127.0.0.1:9/cb"):
        with pytest.raises(InvalidParameterValue):
            check_callback_url(bad)


def _invocation(**kw: Any) -> Invocation:
    base: dict[str, Any] = {
        "id": "inv-1",
        "function": "f",
        "payload": b'{"order": 42}',
        "status": "running",
        "created_at": 0.0,
        "updated_at": 0.0,
        "attempts": (),
        "function_errors": 0,
        "not_before": 0.0,
        "result": None,
        "error": None,
        "idempotency_key": None,
        "source": "api",
        "headers": {},
    }
    base.update(kw)
    return Invocation(**base)


def test_destination_record_shapes() -> None:
    inv = _invocation()
    ok = destination_record(
        inv,
        "Success",
        1795000000.5,
        invoke_count=1,
        version=3,
        outcome="succeeded",
        response=b'{"paid": true}',
    )
    assert ok == {
        "version": "1.0",
        "timestamp": "2026-11-18T11:06:40.500Z",
        "requestContext": {
            "requestId": "inv-1",
            "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f",
            "condition": "Success",
            "approximateInvokeCount": 1,
        },
        "requestPayload": {"order": 42},
        "responseContext": {"statusCode": 200, "executedVersion": "3"},
        "responsePayload": {"paid": True},
    }
    failed = destination_record(
        inv,
        "RetriesExhausted",
        0,
        invoke_count=3,
        version=3,
        outcome="Timeout",
        response=b'{"errorMessage": "Task timed out"}',
    )
    assert failed["responseContext"] == {
        "statusCode": 200,
        "executedVersion": "3",
        "functionError": "Unhandled",
    }
    assert failed["responsePayload"] == {"errorMessage": "Task timed out"}
    throttled = destination_record(
        inv, "EventAgeExceeded", 0, invoke_count=0, version=3, outcome="Throttled", response=b"{}"
    )
    assert throttled["responseContext"] == {"statusCode": 429, "executedVersion": "3"}
    never = destination_record(
        inv, "EventAgeExceeded", 0, invoke_count=0, version=3, outcome=None, response=None
    )
    assert "responseContext" not in never and "responsePayload" not in never
    text = destination_record(
        _invocation(payload=b"not json"),
        "Success",
        0,
        invoke_count=1,
        version=None,
        outcome="succeeded",
        response=b"plain",
    )
    assert text["requestPayload"] == "not json" and text["responsePayload"] == "plain"
    assert text["responseContext"]["executedVersion"] == "$LATEST"


# ------------------------------------------------------------------ the workers, faked


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Functions:
    def __init__(self) -> None:
        self.versions: dict[str, Version] = {}

    def add(self, name: str, **spec: Any) -> None:
        number = self.versions[name].number + 1 if name in self.versions else 1
        self.versions[name] = Version(parse_spec({"name": name, **spec}), number, "c" * 64, None, 0)

    def current(self, name: str) -> Version:
        try:
            return self.versions[name]
        except KeyError:
            raise ResourceNotFound(f"function {name!r} does not exist") from None

    def all(self) -> list[FunctionRecord]:
        return [FunctionRecord(n, 0, v) for n, v in sorted(self.versions.items())]


Step = Callable[[str, bytes], Awaitable[InvokeResult]]


class Invoker:
    """Runs a script per function: each call pops the next step (the last one repeats)."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.calls: list[tuple[str, bytes, str]] = []

    def script(self, name: str, *steps: Step) -> None:
        self.scripts[name] = list(steps)

    async def invoke(
        self, name: str, event: bytes, *, request_id: uuid.UUID | None = None
    ) -> InvokeResult:
        self.calls.append((name, event, str(request_id)))
        steps = self.scripts.get(name) or [ok()]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        return await step(str(request_id), event)


def ok(body: bytes = b'{"ok": true}') -> Step:
    async def step(rid: str, _: bytes) -> InvokeResult:
        return InvokeResult(rid, body)

    return step


def echo() -> Step:
    async def step(rid: str, event: bytes) -> InvokeResult:
        return InvokeResult(rid, event)

    return step


def fail(kind: Any = "Unhandled") -> Step:
    async def step(rid: str, _: bytes) -> InvokeResult:
        return InvokeResult(rid, b'{"errorMessage": "boom", "errorType": "Exception"}', error=kind)

    return step


def raises(error: Exception) -> Step:
    async def step(rid: str, _: bytes) -> InvokeResult:
        raise error

    return step


def blocks(gate: asyncio.Event) -> Step:
    async def step(rid: str, _: bytes) -> InvokeResult:
        await gate.wait()
        return InvokeResult(rid, b"{}")

    return step


class Poster:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[tuple[str, Any, dict[str, str]]] = []

    async def __call__(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        self.posts.append((url, orjson.loads(body) if body else None, dict(headers)))
        return self.status


class World:
    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        self.queue = MemoryQueue()
        self.functions = Functions()
        self.invoker = Invoker()
        self.poster = Poster()
        self.ai = AsyncInvoker(
            self.queue,
            self.functions,
            self.invoker,
            clock=self.clock,
            post=self.poster,
            rand=lambda: HALF,
            **kw,
        )

    async def round(self) -> int:
        """One leasing round, then wait for every worker and delivery it started."""
        started = await self.ai.run_once()
        while self.ai.pending_tasks():
            await asyncio.gather(*self.ai.pending_tasks())
        return started

    async def drain(self, *, step: float = 1.0, rounds: int = 100) -> None:
        """Rounds until nothing is queued or running, moving the clock ``step`` each time."""
        for _ in range(rounds):
            await self.round()
            live = await self.queue.list(status="queued") + await self.queue.list(status="running")
            if not live:
                return
            self.clock.now += step
        raise AssertionError("did not drain")

    async def get(self, invocation_id: str) -> Invocation:
        return await self.queue.get(invocation_id)


def run(body: Callable[[World], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        world = World(**kw)
        await world.ai.open()
        try:
            await body(world)
        finally:
            await world.ai.close()

    asyncio.run(main())


def outcomes(inv: Invocation) -> list[str | None]:
    return [a.outcome for a in inv.attempts]


def test_submit_checks_before_queueing() -> None:
    async def body(w: World) -> None:
        with pytest.raises(ResourceNotFound):
            await w.ai.submit("nope", b"{}")
        w.functions.add("f")
        with pytest.raises(RequestTooLarge):
            await w.ai.submit("f", b"x" * 1025)
        assert await w.queue.list() == []
        inv, created = await w.ai.submit("f", b"x" * 1024, idempotency_key="k")
        again, created2 = await w.ai.submit("f", b"{}", idempotency_key="k")
        assert created and not created2 and again.id == inv.id
        assert len(await w.queue.list()) == 1

    run(body, max_payload=1024)


def test_success_runs_with_the_attempts_request_id() -> None:
    async def body(w: World) -> None:
        w.functions.add("f")
        inv, _ = await w.ai.submit("f", b'{"a": 1}')
        assert await w.round() == 1
        done = await w.get(inv.id)
        assert done.status == "succeeded" and done.result == b'{"ok": true}'
        assert outcomes(done) == ["succeeded"]
        assert w.invoker.calls == [("f", b'{"a": 1}', done.attempts[0].request_id)]
        assert w.poster.posts == []

    run(body)


def test_function_errors_retry_with_backoff_then_succeed() -> None:
    async def body(w: World) -> None:
        w.functions.add("f", **{"async": {"backoff_base": 2, "backoff_factor": 3}})
        w.invoker.script("f", fail(), fail("Timeout"), ok())
        inv, _ = await w.ai.submit("f", b"{}")
        t0 = w.clock.now
        await w.round()
        first = await w.get(inv.id)
        assert first.status == "queued" and first.not_before == t0 + 2
        assert first.function_errors == 1 and outcomes(first) == ["Unhandled"]
        assert await w.round() == 0  # not due yet
        w.clock.now = t0 + 2
        await w.round()
        second = await w.get(inv.id)
        assert second.not_before == t0 + 2 + 6 and second.function_errors == 2
        w.clock.now = t0 + 8
        await w.round()
        done = await w.get(inv.id)
        assert done.status == "succeeded" and done.error is None
        assert outcomes(done) == ["Unhandled", "Timeout", "succeeded"]

    run(body)


def test_retries_exhausted_dead_letters_to_every_destination() -> None:
    async def body(w: World) -> None:
        w.functions.add("sink")
        w.invoker.script("sink", echo())
        w.functions.add(
            "f",
            **{
                "async": {
                    "max_retries": 1,
                    "on_failure": "function:sink",
                    "dead_letter": "http://127.0.0.1:9/dlq",
                    "on_success": "http://127.0.0.1:9/never",
                }
            },
        )
        w.invoker.script("f", fail())
        inv, _ = await w.ai.submit(
            "f", b'{"n": 1}', headers={"x-callback-url": "http://127.0.0.1:9/cb"}
        )
        await w.drain()
        dead = await w.get(inv.id)
        assert dead.status == "dead-lettered" and outcomes(dead) == ["Unhandled", "Unhandled"]
        assert orjson.loads(dead.error or b"")["errorMessage"] == "boom"

        # on_failure: an async invocation of the sink with Lambda's record, run once.
        [sunk] = await w.queue.list(function="sink")
        assert sunk.source == "destination:f" and sunk.idempotency_key == f"{inv.id}:on_failure"
        record = orjson.loads(sunk.result or b"")
        assert record["requestContext"] == {
            "requestId": inv.id,
            "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f",
            "condition": "RetriesExhausted",
            "approximateInvokeCount": 2,
        }
        assert record["requestPayload"] == {"n": 1}
        assert record["responseContext"]["functionError"] == "Unhandled"
        assert record["responsePayload"]["errorMessage"] == "boom"

        # dead_letter: POSTed; the callback: the error body with status 500.
        urls = [p[0] for p in w.poster.posts]
        assert sorted(urls) == ["http://127.0.0.1:9/cb", "http://127.0.0.1:9/dlq"]
        dlq = next(p for p in w.poster.posts if p[0].endswith("/dlq"))
        assert dlq[1] == record
        cb = next(p for p in w.poster.posts if p[0].endswith("/cb"))
        assert cb[1]["errorMessage"] == "boom"
        assert cb[2]["x-function-status"] == "500"
        assert cb[2]["x-nimbus-invocation-id"] == cb[2]["x-call-id"] == inv.id

    run(body)


def test_on_success_and_callback() -> None:
    async def body(w: World) -> None:
        w.functions.add("f", **{"async": {"on_success": "http://127.0.0.1:9/ok"}})
        await w.ai.submit("f", b"[1]", headers={"x-callback-url": "http://cb.test/x"})
        await w.round()
        assert {p[0] for p in w.poster.posts} == {"http://127.0.0.1:9/ok", "http://cb.test/x"}
        success = next(p for p in w.poster.posts if p[0].endswith("/ok"))[1]
        assert success["requestContext"]["condition"] == "Success"
        assert success["requestContext"]["approximateInvokeCount"] == 1
        assert success["responsePayload"] == {"ok": True}
        assert success["responseContext"] == {"statusCode": 200, "executedVersion": "1"}
        cb = next(p for p in w.poster.posts if p[0] == "http://cb.test/x")
        assert cb[1] == {"ok": True} and cb[2]["x-function-status"] == "200"

    run(body)


def test_http_deliveries_are_retried_then_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        w.poster.status = 503
        w.functions.add("f", **{"async": {"on_success": "http://127.0.0.1:9/ok"}})
        await w.ai.submit("f", b"{}")
        await w.round()
        assert len(w.poster.posts) == 4  # DELIVERY_ATTEMPTS, then logged and dropped
        assert (await w.queue.list())[0].status == "succeeded"

    monkeypatch.setattr("nimbus.asyncinvoke.delivery.backoff", lambda *a, **k: 0.0)
    run(body)


def test_throttling_is_retried_without_counting_until_the_event_is_too_old() -> None:
    async def body(w: World) -> None:
        w.functions.add(
            "f",
            **{"async": {"max_retries": 0, "max_event_age": 60, "on_failure": "http://x.test/f"}},
        )
        w.invoker.script("f", raises(TooManyRequests("busy")))
        inv, _ = await w.ai.submit("f", b"{}")
        await w.drain(step=5)
        dead = await w.get(inv.id)
        assert dead.status == "dead-lettered" and dead.function_errors == 0
        assert set(outcomes(dead)) == {"Throttled"} and len(dead.attempts) > 3
        [(_, record, _)] = w.poster.posts
        assert record["requestContext"]["condition"] == "EventAgeExceeded"
        assert record["requestContext"]["approximateInvokeCount"] == 0
        assert record["responseContext"]["statusCode"] == 429
        assert dead.updated_at - dead.created_at < 60

    run(body)


def test_platform_errors_are_retried_without_counting() -> None:
    async def body(w: World) -> None:
        w.functions.add("f", **{"async": {"max_retries": 0}})
        w.invoker.script(
            "f", raises(RuntimeError("zygote died")), raises(ServiceException("disk")), ok()
        )
        inv, _ = await w.ai.submit("f", b"{}")
        await w.drain(step=10)
        done = await w.get(inv.id)
        assert done.status == "succeeded"
        assert outcomes(done) == ["ServiceError", "ServiceError", "succeeded"]
        assert orjson.loads(done.attempts[0].error or b"")["errorType"] == "ServiceException"

    run(body)


def test_an_event_past_its_age_is_dead_lettered_without_running() -> None:
    async def body(w: World) -> None:
        w.functions.add("f", **{"async": {"max_event_age": 60, "on_failure": "http://x.test/f"}})
        w.invoker.script("f", fail(), ok())
        inv, _ = await w.ai.submit("f", b"{}")
        await w.round()  # fails once, retried after 1 s
        w.clock.now += 61  # e.g. the node was down
        await w.round()
        dead = await w.get(inv.id)
        assert dead.status == "dead-lettered"
        assert outcomes(dead) == ["Unhandled", AGE_EXCEEDED]
        assert len(w.invoker.calls) == 1
        [(_, record, _)] = w.poster.posts
        assert record["requestContext"]["condition"] == "EventAgeExceeded"
        assert record["requestContext"]["approximateInvokeCount"] == 1
        assert record["responsePayload"]["errorMessage"] == "boom"  # the last attempt that ran

    run(body)


def test_deleted_function_fails_without_destinations() -> None:
    async def body(w: World) -> None:
        w.functions.add("f", **{"async": {"on_failure": "http://x.test/f"}})
        w.invoker.script("f", raises(ResourceNotFound("gone")))
        inv, _ = await w.ai.submit("f", b"{}", headers={"x-callback-url": "http://x.test/cb"})
        await w.round()
        failed = await w.get(inv.id)
        assert failed.status == "failed" and outcomes(failed) == ["ResourceNotFound"]
        assert w.poster.posts == []
        # Deleted before it was leased: failed without even trying.
        w.functions.add("g")
        other, _ = await w.ai.submit("g", b"{}")
        del w.functions.versions["g"]
        w.ai._hot.add("g")
        await w.round()
        assert (await w.get(other.id)).status == "failed"

    run(body)


def test_per_function_and_node_caps() -> None:
    async def body(w: World) -> None:
        gate = asyncio.Event()
        w.functions.add("f", scaling={"max": 4})  # cap 2
        w.functions.add("g", **{"async": {"max_concurrency": 5}})
        w.invoker.script("f", blocks(gate))
        w.invoker.script("g", blocks(gate))
        for _ in range(6):
            await w.ai.submit("f", b"{}")
            await w.ai.submit("g", b"{}")
        for _ in range(3):
            await w.ai.run_once()
        assert w.ai.busy == {"f": 2, "g": 1}  # f at its cap, the node (3) full
        running = await w.queue.list(status="running")
        assert sorted(i.function for i in running) == ["f", "f", "g"]
        # Queued ones are still queued, so they can be cancelled.
        queued = await w.queue.list(function="f", status="queued")
        await w.ai.cancel(queued[0].id)
        with pytest.raises(ResourceConflict):
            await w.ai.cancel(running[0].id)
        assert await w.ai.running("f", "api") == 5
        gate.set()
        while w.ai.pending_tasks():
            await asyncio.gather(*w.ai.pending_tasks())
        assert w.ai.busy == {}
        await w.drain()
        assert len(await w.queue.list(status="succeeded")) == 11
        assert len(await w.queue.list(status="cancelled")) == 1

    run(body, max_concurrency=3)


def test_probe_finds_work_nobody_announced() -> None:
    async def body(w: World) -> None:
        w.functions.add("f")
        # Submitted straight to the queue, as by a previous process.
        inv, _ = await w.queue.submit("f", b"{}", now=w.clock.now)
        await w.round()
        assert (await w.get(inv.id)).status == "succeeded"

    run(body)


def test_expired_leases_are_delivered_again() -> None:
    async def body(w: World) -> None:
        w.functions.add("f", timeout=1)
        inv, _ = await w.queue.submit("f", b"{}", now=w.clock.now)
        await w.queue.lease(now=w.clock.now, lease_for=7, limit=1)  # a process that died
        w.clock.now += 7
        await w.round()
        done = await w.get(inv.id)
        assert done.status == "succeeded" and outcomes(done) == ["LeaseExpired", "succeeded"]

    run(body)


def test_close_puts_running_attempts_back() -> None:
    async def body(w: World) -> None:
        w.functions.add("f")
        w.invoker.script("f", blocks(asyncio.Event()))
        inv, _ = await w.ai.submit("f", b"{}")
        await w.ai.run_once()
        await asyncio.sleep(0)
        assert (await w.get(inv.id)).status == "running"
        await w.ai.close()
        back = await w.get(inv.id)
        assert back.status == "queued" and back.not_before == w.clock.now
        assert outcomes(back) == ["Interrupted"] and back.function_errors == 0

    run(body, grace=0.01)


def test_function_destination_records_are_deduplicated_across_redelivery() -> None:
    async def body(w: World) -> None:
        w.functions.add("sink")
        w.functions.add("f", **{"async": {"on_success": "function:sink"}})
        inv, _ = await w.ai.submit("f", b"{}")
        await w.round()
        # A redelivered duplicate success (lease expired) submits the same record key.
        lease_inv = await w.get(inv.id)
        record = {"requestContext": {"requestId": lease_inv.id}}
        await w.ai._to_function("function:sink", record, lease_inv, "on_success")
        assert len(await w.queue.list(function="sink")) == 1

    run(body)


class Logs:
    def __init__(self) -> None:
        self.queries: list[tuple[str, str | None]] = []

    async def query(
        self,
        function: str,
        *,
        since: float | None = None,
        after: int | None = None,
        limit: int = 1000,
        request_id: str | None = None,
    ) -> list[Any]:
        from nimbus.observability.logs import LogRecord

        self.queries.append((function, request_id))
        return [LogRecord(1, 0.0, function, 1, "i", request_id or "", f"START {request_id}")]


def test_attempt_logs_are_found_by_request_id() -> None:
    async def body(w: World) -> None:
        w.functions.add("f")
        w.invoker.script("f", fail(), ok())
        inv, _ = await w.ai.submit("f", b"{}")
        await w.drain()
        done = await w.get(inv.id)
        logs = await w.ai.attempt_logs(done)
        rids = [a.request_id for a in done.attempts]
        assert list(logs) == rids and len(set(rids)) == 2
        assert all(logs[r][0].message == f"START {r}" for r in rids)

    async def main() -> None:
        w = World()
        w.ai = AsyncInvoker(w.queue, w.functions, w.invoker, Logs(), clock=w.clock, post=w.poster)
        await w.ai.open()
        try:
            await body(w)
        finally:
            await w.ai.close()

    asyncio.run(main())


def test_the_dispatcher_runs_what_is_submitted() -> None:
    """start(): the real loop, real time — submit wakes it; a retry's timer wakes it again."""

    async def main() -> None:
        functions, invoker, poster = Functions(), Invoker(), Poster()
        functions.add("f", **{"async": {"backoff_base": 0.05}})
        invoker.script("f", fail(), ok())
        ai = AsyncInvoker(MemoryQueue(), functions, invoker, post=poster, poll_interval=5)
        await ai.start()
        try:
            inv, _ = await ai.submit("f", b"{}")
            for _ in range(200):
                got = await ai.get(inv.id)
                if got.status == "succeeded":
                    break
                await asyncio.sleep(0.01)
            assert outcomes(got) == ["Unhandled", "succeeded"]
        finally:
            await ai.close()

    asyncio.run(main())


# ---------------------------------------- the Event invoke: fast path and API route alike


def test_event_invoke_fast_path_and_api_route_answer_alike(tmp_path: Any) -> None:
    """``Nimbus.__call__`` sends Event invokes to the bare fast path; the FastAPI route
    (the one in the OpenAPI document) must behave the same."""
    import types

    import httpx

    from nimbus.api import build_api
    from nimbus.gateway.asyncapp import AsyncGateway, is_event_invoke

    async def main() -> None:
        functions = Functions()
        functions.add("f")
        ai = AsyncInvoker(MemoryQueue(), functions, Invoker(), max_payload=100)
        await ai.open()
        fake = types.SimpleNamespace(max_payload=1000)
        api = build_api(
            functions,  # type: ignore[arg-type]
            fake,  # type: ignore[arg-type]
            fake,  # type: ignore[arg-type]
            fake,  # type: ignore[arg-type]
            fake,  # type: ignore[arg-type]
            tmp_dir=tmp_path,
            max_zip_bytes=1000,
            async_invoker=ai,
        )
        gateway = AsyncGateway(ai)

        async def fast(scope: Any, receive: Any, send: Any) -> None:
            assert is_event_invoke(scope)
            await gateway.invoke_event(scope, receive, send)

        def cases(key: str) -> list[tuple[str, bytes, dict[str, str]]]:
            return [
                ("/v1/functions/f/invoke", b'{"a": 1}', {"idempotency-key": key}),
                ("/v1/functions/f/invoke", b"", {"idempotency-key": key}),  # replay
                ("/v1/functions/f/invoke", b"", {}),
                ("/v1/functions/nope/invoke", b"{}", {}),
                ("/v1/functions/f/invoke", b"x" * 101, {}),
                ("/v1/functions/f/invoke", b"{bad", {}),
                ("/v1/functions/f/invoke", b"{}", {"x-callback-url": "mailto:me"}),
                ("/v1/functions/f/invoke", b"{}", {"idempotency-key": ""}),
            ]

        from nimbus.auth.edge import ANONYMOUS_ADMIN, PRINCIPAL

        def authenticated(app: Any) -> Any:
            """What the edge does before either: the request's principal in its scope."""

            async def wrapped(scope: Any, receive: Any, send: Any) -> None:
                scope[PRINCIPAL] = ANONYMOUS_ADMIN
                await app(scope, receive, send)

            return wrapped

        answers = []
        for key, app in (("k1", fast), ("k2", api)):
            transport = httpx.ASGITransport(app=authenticated(app))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                got = []
                for path, body, headers in cases(key):
                    r = await client.post(
                        path, content=body, headers={"x-amz-invocation-type": "Event", **headers}
                    )
                    got.append(
                        (
                            r.status_code,
                            r.json().get("error", {}).get("code"),
                            r.headers.get("x-nimbus-idempotent-replay"),
                            "x-nimbus-invocation-id" in r.headers,
                        )
                    )
                answers.append(got)
        assert answers[0] == answers[1]
        assert [a[0] for a in answers[0]] == [202, 202, 202, 404, 413, 400, 400, 400]
        assert answers[0][1][2] == "true"
        stored = await ai.list_invocations(function="f")
        assert len(stored) == 4  # per app: one with its key (then replayed), one without
        await ai.close()

    asyncio.run(main())
