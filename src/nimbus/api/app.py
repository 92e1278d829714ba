"""The control plane: ``/v1`` (FastAPI, OpenAPI at ``/openapi.json``), ``/healthz``, ``/metrics``.

Handlers are thin: they parse the request, call :class:`~nimbus.functions.Functions`
or the :class:`~nimbus.invoke.Invoker`, and shape the answer. Every error leaves
as ``{"error": {"code", "message"}}`` (see :mod:`nimbus.errors`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nimbus.api.invocations import invocation_type, invocations_router
from nimbus.api.scopes import REDACTED, may_deploy, needs
from nimbus.asyncinvoke import AsyncInvoker
from nimbus.errors import (
    InvalidParameterValue,
    NimbusError,
    RequestTooLarge,
    ServiceException,
    headers_of,
    status_of,
)
from nimbus.functions import Functions, Progress
from nimbus.gateway.app import read_body
from nimbus.gateway.asyncapp import accept_event, json_event
from nimbus.invoke import Invoker
from nimbus.models import FunctionRecord, FunctionSpec, InvokeContext, Version
from nimbus.observability.logs import LogStore, parse_since
from nimbus.observability.metrics import Metrics
from nimbus.packaging.zips import too_large
from nimbus.scheduling import Scheduler
from nimbus.triggers.specs import view as trigger_view

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: Lambda's limit on a client context, bytes of base64.
MAX_CLIENT_CONTEXT = 3583


def invoke_context(headers: Any) -> InvokeContext:
    """``X-Amzn-Trace-Id`` and ``X-Amz-Client-Context`` (base64 JSON, as the Lambda API
    takes it) of a direct invoke."""
    trace = headers.get("x-amzn-trace-id")
    raw = headers.get("x-amz-client-context")
    client_context = None
    if raw:
        if len(raw) > MAX_CLIENT_CONTEXT:
            raise InvalidParameterValue(
                f"X-Amz-Client-Context is {len(raw)} bytes; the limit is {MAX_CLIENT_CONTEXT}"
            )
        try:
            client_context = orjson.loads(base64.b64decode(raw, validate=True))
        except (ValueError, orjson.JSONDecodeError):
            raise InvalidParameterValue(
                "X-Amz-Client-Context must be a base64-encoded JSON object"
            ) from None
        if not isinstance(client_context, dict):
            raise InvalidParameterValue("X-Amz-Client-Context must be a JSON object")
    valid_trace = trace if trace and trace.startswith("Root=") and len(trace) <= 256 else None
    return InvokeContext(trace_id=valid_trace, client_context=client_context)


def _error(e: NimbusError) -> JSONResponse:
    return JSONResponse(e.to_wire(), status_code=status_of(e), headers=headers_of(e))


def build_api(
    functions: Functions,
    invoker: Invoker,
    scheduler: Scheduler,
    logs: LogStore,
    metrics: Metrics,
    *,
    tmp_dir: Path,
    max_zip_bytes: int,
    lifespan: Lifespan | None = None,
    zygote_up: Callable[[], bool] = lambda: False,
    function_zygote_up: Callable[[str], bool] = lambda _: False,
    async_invoker: AsyncInvoker | None = None,
    function_domain: str = "localhost",
) -> FastAPI:
    app = FastAPI(
        title="Nimbus",
        version="0.1.0",
        description="Self-hosted serverless functions. See docs/api.md.",
        default_response_class=JSONResponse,
        lifespan=lifespan,
        # Served below, behind a key like every route but /healthz; no browsable docs.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/openapi.json", include_in_schema=False, dependencies=[needs("read")])
    async def openapi() -> Any:
        return app.openapi()

    # -- errors --------------------------------------------------------------------------
    @app.exception_handler(NimbusError)
    async def nimbus_error(_: Request, e: NimbusError) -> Response:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        parts = []
        for err in e.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
            where = ".".join(loc) or "request"
            msg = "is required" if err.get("type") == "missing" else err.get("msg", "is invalid")
            parts.append(f"{where}: {msg}")
        return _error(InvalidParameterValue("; ".join(parts)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "ResourceNotFound", 405: "InvalidParameterValue"}.get(
            e.status_code, "ServiceException"
        )
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> Response:
        return _error(ServiceException(f"internal error: {type(e).__name__}"))

    # -- helpers ---------------------------------------------------------------------------
    def public_spec(spec: FunctionSpec, *, reveal: bool = True) -> dict[str, Any]:
        """The spec as shown: broker URLs without their passwords; the environment's values
        only to a reader who may deploy (``reveal``)."""
        data = spec.model_dump(mode="json")
        data["triggers"] = [trigger_view(t) for t in data["triggers"]]
        if not reveal:
            data["environment"] = {k: REDACTED for k in data["environment"]}
        return data

    def function_out(
        record: FunctionRecord, versions: list[Version] | None = None, *, reveal: bool = True
    ) -> dict[str, Any]:
        v = record.current
        counts = scheduler.counts(record.name)
        out: dict[str, Any] = {
            "name": record.name,
            "version": v.number,
            "spec": public_spec(v.spec, reveal=reveal),
            "code_sha256": v.code_sha256,
            "layer_sha256": v.layer_sha256,
            "created_at": _iso(record.created_at),
            "updated_at": _iso(v.created_at),
            "instances": {
                "total": counts.total,
                "warm": counts.idle + counts.busy,
                "idle": counts.idle,
                "busy": counts.busy,
                "starting": counts.starting,
            },
            "starts": invoker.starts(record.name),
            "zygote": {
                "runtime": v.spec.runtime,
                "up": zygote_up(),
                "function": function_zygote_up(record.name),
            },
            "url": f"/function/{record.name}",
            # Its own host, at whose root it is served (as a Lambda function URL).
            "hostname": f"{record.name}.{function_domain}",
        }
        if versions is not None:
            out["versions"] = [
                {
                    "version": x.number,
                    "created_at": _iso(x.created_at),
                    "code_sha256": x.code_sha256,
                }
                for x in versions
            ]
        return out

    async def parse_spec_field(spec: str | None) -> Any:
        if spec is None:
            return None
        try:
            return orjson.loads(spec)
        except orjson.JSONDecodeError as e:
            raise InvalidParameterValue(f"spec: not valid JSON ({e})") from None

    @contextlib.asynccontextmanager
    async def saved_zip(code: UploadFile | None) -> AsyncIterator[Path | None]:
        if code is None:
            yield None
            return
        if code.size is not None and code.size > max_zip_bytes:
            raise RequestTooLarge(too_large("code zip is", code.size, max_zip_bytes))
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=tmp_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                await asyncio.to_thread(shutil.copyfileobj, code.file, out, 1 << 20)
            yield path
        finally:
            path.unlink(missing_ok=True)

    # -- functions ---------------------------------------------------------------------------
    async def deploying(
        request: Request,
        status: int,
        code: UploadFile | None,
        run: Callable[[Path | None, Progress], Awaitable[FunctionRecord]],
    ) -> Response:
        """Run a deploy; with ``Accept: application/x-ndjson`` stream its progress.

        Streamed, the answer is ``200`` with one JSON object per line: ``{"step",
        "message"}`` while it works (unpacking, each line pip prints, the init), then
        ``{"result": <function>}`` or ``{"error": {...}, "status": <HTTP status>}``.
        A client that goes away does not stop the deploy. The uploaded zip is kept in a
        temporary file until the deploy is done.
        """
        upload = contextlib.AsyncExitStack()
        path = await upload.enter_async_context(saved_zip(code))
        if "application/x-ndjson" not in request.headers.get("accept", ""):
            try:
                record = await run(path, lambda _step, _message: None)
            finally:
                await upload.aclose()
            return JSONResponse(function_out(record, await functions.versions(record.name)), status)
        events: asyncio.Queue[bytes | None] = asyncio.Queue()

        def progress(step: str, message: str) -> None:
            events.put_nowait(orjson.dumps({"step": step, "message": message}) + b"\n")

        async def work() -> None:
            try:
                record = await run(path, progress)
                out = function_out(record, await functions.versions(record.name))
                events.put_nowait(orjson.dumps({"result": out}) + b"\n")
            except NimbusError as e:
                line = {**e.to_wire(), "status": status_of(e)}
                events.put_nowait(orjson.dumps(line) + b"\n")
            except Exception as e:  # the same as the API answers for anything unexpected
                error = ServiceException(f"internal error: {type(e).__name__}")
                events.put_nowait(orjson.dumps({**error.to_wire(), "status": 500}) + b"\n")
            finally:
                await upload.aclose()
                events.put_nowait(None)

        task = asyncio.get_running_loop().create_task(work())
        deploys.add(task)
        task.add_done_callback(deploys.discard)

        async def stream() -> AsyncIterator[bytes]:
            while (line := await events.get()) is not None:
                yield line

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    deploys: set[asyncio.Task[None]] = set()

    @app.post(
        "/v1/functions",
        status_code=201,
        tags=["functions"],
        dependencies=[needs("deploy")],
        responses={
            200: {"description": "the deploy's progress, with Accept: application/x-ndjson"}
        },
    )
    async def create_function(
        request: Request,
        spec: Annotated[str, Form(description="the function spec, JSON")],
        code: Annotated[UploadFile, File(description="zip of the function directory")],
        force: Annotated[bool, Form(description="publish even if the init fails")] = False,
    ) -> Any:
        data = await parse_spec_field(spec)

        async def run(path: Path | None, progress: Progress) -> FunctionRecord:
            assert path is not None
            return await functions.create(data, path, force=force, progress=progress)

        return await deploying(request, 201, code, run)

    @app.put(
        "/v1/functions/{name}",
        tags=["functions"],
        dependencies=[needs("deploy")],
        responses={200: {"description": "the function (or the deploy's progress)"}},
    )
    async def update_function(
        request: Request,
        name: str,
        spec: Annotated[str | None, Form()] = None,
        code: Annotated[UploadFile | None, File()] = None,
        force: Annotated[bool, Form(description="publish even if the init fails")] = False,
    ) -> Any:
        data = await parse_spec_field(spec)

        async def run(path: Path | None, progress: Progress) -> FunctionRecord:
            return await functions.update(name, data, path, force=force, progress=progress)

        return await deploying(request, 200, code, run)

    @app.get("/v1/functions", tags=["functions"], dependencies=[needs("read")])
    async def list_functions(request: Request) -> Any:
        reveal = may_deploy(request)
        return {"functions": [function_out(r, reveal=reveal) for r in functions.all()]}

    @app.get("/v1/functions/{name}", tags=["functions"], dependencies=[needs("read")])
    async def get_function(request: Request, name: str) -> Any:
        record = functions.get(name)
        return function_out(record, await functions.versions(name), reveal=may_deploy(request))

    @app.delete(
        "/v1/functions/{name}", status_code=204, tags=["functions"], dependencies=[needs("deploy")]
    )
    async def delete_function(name: str) -> Response:
        await functions.delete(name)
        return Response(status_code=204)

    # -- invoke ------------------------------------------------------------------------------
    @app.post("/v1/functions/{name}/invoke", tags=["invoke"], dependencies=[needs("invoke")])
    async def invoke(name: str, request: Request) -> Response:
        functions.current(name)  # 404 before reading a body
        kind = invocation_type(request.headers)
        if kind == "Event" and async_invoker is not None:
            return await invoke_event(name, request, async_invoker)
        if kind == "DryRun":
            return Response(status_code=204)
        context = invoke_context(request.headers)
        body = json_event(await read_body(request.scope, request.receive, invoker.max_payload))
        result = await invoker.invoke(name, body, context=context)
        headers = {"x-nimbus-request-id": result.request_id}
        if result.error is not None:
            headers["x-nimbus-function-error"] = result.error
        return Response(result.body, media_type="application/json", headers=headers)

    async def invoke_event(name: str, request: Request, async_invoker: AsyncInvoker) -> Response:
        """``X-Nimbus-Invocation-Type: Event``: 202 once the invocation is stored durably.

        ``Nimbus.__call__`` sends these to the gateway's bare fast path first; this route
        is what the OpenAPI document describes, and the same code.
        """
        invocation, created = await accept_event(
            async_invoker,
            name,
            request.headers,
            lambda limit: read_body(request.scope, request.receive, limit),
        )
        out = {"x-nimbus-invocation-id": invocation.id}
        if not created:
            out["x-nimbus-idempotent-replay"] = "true"
        return JSONResponse({"invocation_id": invocation.id}, status_code=202, headers=out)

    if async_invoker is not None:
        app.include_router(invocations_router(async_invoker))

    # -- logs --------------------------------------------------------------------------------
    @app.get("/v1/functions/{name}/logs", tags=["logs"], dependencies=[needs("read")])
    async def get_logs(
        name: str,
        since: str | None = None,
        after: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
        follow: bool = False,
        request_id: str | None = None,
    ) -> Any:
        functions.get(name)
        since_ts = parse_since(since, time.time()) if since else None
        if follow:
            # The latest `limit` records (or those matching since/after), then live ones.
            backlog = await logs.query(
                name, since=since_ts, after=after, limit=limit, request_id=request_id
            )
            start = backlog[-1].seq if backlog else (after if after is not None else None)

            async def stream() -> AsyncIterator[bytes]:
                for record in backlog:
                    yield orjson.dumps(record.to_wire()) + b"\n"
                live = logs.follow(
                    name,
                    since=since_ts if start is None else None,
                    after=start,
                    request_id=request_id,
                )
                async with contextlib.aclosing(live):
                    async for record in live:
                        yield orjson.dumps(record.to_wire()) + b"\n"

            return StreamingResponse(stream(), media_type="application/x-ndjson")
        records = await logs.query(
            name, since=since_ts, after=after, limit=limit, request_id=request_id
        )
        nxt = records[-1].seq if records else (after or 0)
        return {"records": [r.to_wire() for r in records], "next": nxt}

    # -- health and metrics ------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Any:
        return {"status": "ok", "functions": len(functions.all()), "instances": scheduler.total}

    @app.get("/metrics", tags=["ops"], dependencies=[needs("read")])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
