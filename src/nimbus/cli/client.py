"""A small client for the Nimbus HTTP API (docs/api.md): one method per call.

Every failure becomes a :class:`~nimbus.cli.common.CliError` with a sentence a
person understands: a refused connection says to start ``nimbus up``; an API
error body ``{"error": {"code", "message"}}`` becomes its message (with the code
and HTTP status kept on the exception for callers that branch on them).

The transport is injectable (``httpx.MockTransport`` in unit tests).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from nimbus.cli.common import CliError

#: Control-plane calls answer at once.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
#: A deploy waits for ``pip install`` on the server, which can take minutes.
DEPLOY_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=600.0, pool=5.0)
#: An invocation may run for the maximum function timeout (900 s) plus queueing.
INVOKE_TIMEOUT = httpx.Timeout(connect=5.0, read=1000.0, write=60.0, pool=5.0)
#: ``logs --follow`` waits for new records for as long as the user wants.
FOLLOW_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=5.0)

#: Upload chunk: small enough for a smooth progress bar, large enough to be cheap.
CHUNK = 64 * 1024

ProgressCallback = Callable[[int], None]
#: ``on_step(step, message)``: a line of a deploy's progress, as the server reports it.
StepCallback = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class InvokeResponse:
    """The raw result of a direct invocation.

    ``function_error`` is the ``X-Nimbus-Function-Error`` header (``Unhandled``,
    ``Timeout``, ...) when the function failed; ``body`` is then Lambda's error JSON.
    """

    body: bytes
    function_error: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class AsyncInvokeResponse:
    """An accepted asynchronous invocation. ``replay`` is true when an
    ``Idempotency-Key`` matched an earlier one, whose id this is."""

    invocation_id: str
    replay: bool


@dataclass(frozen=True, slots=True)
class Upload:
    """A ``multipart/form-data`` body with a ``spec`` part and a ``code`` zip part.

    Built by hand (it is short) so the body can be streamed in chunks that drive
    a progress bar; httpx's own encoder is private API.
    """

    content_type: str
    parts: tuple[bytes, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any], code: bytes, *, force: bool = False) -> Upload:
        boundary = secrets.token_hex(16)
        spec_json = json.dumps(spec, default=str)
        forced = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="force"\r\n\r\ntrue\r\n'
            if force
            else ""
        )
        head = (
            forced + f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="spec"\r\n'
            "\r\n"
            f"{spec_json}\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="code"; filename="code.zip"\r\n'
            "Content-Type: application/zip\r\n"
            "\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        return cls(f"multipart/form-data; boundary={boundary}", (head, code, tail))

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    def chunks(
        self,
        on_progress: ProgressCallback | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Iterator[bytes]:
        """The body in chunks: ``on_progress(n)`` after each is sent, ``on_sent()`` after all."""
        for part in self.parts:
            for start in range(0, len(part), CHUNK):
                chunk = part[start : start + CHUNK]
                yield chunk
                # httpx asks for the next chunk only once this one is written.
                if on_progress is not None:
                    on_progress(len(chunk))
        if on_sent is not None:
            on_sent()


class Client:
    """Talks to one Nimbus server. Use as a context manager (it holds a connection pool)."""

    def __init__(
        self,
        url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"user-agent": "nimbus-cli"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.url, transport=transport, timeout=DEFAULT_TIMEOUT, headers=headers
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- functions -----------------------------------------------------------

    def list_functions(self) -> list[dict[str, Any]]:
        body = self._json(self._send("GET", "/v1/functions"))
        functions = body.get("functions")
        if not isinstance(functions, list):
            raise CliError(f"Nimbus at {self.url} answered an unexpected list: {body!r:.200}")
        return [f for f in functions if isinstance(f, dict)]

    def get_function(self, name: str) -> dict[str, Any]:
        return self._json(self._send("GET", _function_path(name)))

    def create_function(
        self,
        upload: Upload,
        on_progress: ProgressCallback | None = None,
        on_sent: Callable[[], None] | None = None,
        on_step: StepCallback | None = None,
    ) -> dict[str, Any]:
        return self._upload("POST", "/v1/functions", upload, on_progress, on_sent, on_step)

    def update_function(
        self,
        name: str,
        upload: Upload,
        on_progress: ProgressCallback | None = None,
        on_sent: Callable[[], None] | None = None,
        on_step: StepCallback | None = None,
    ) -> dict[str, Any]:
        return self._upload("PUT", _function_path(name), upload, on_progress, on_sent, on_step)

    # -- keys --------------------------------------------------------------
    def create_key(self, name: str, scopes: list[str]) -> dict[str, Any]:
        return self._json(self._send("POST", "/v1/keys", json={"name": name, "scopes": scopes}))

    def list_keys(self) -> list[dict[str, Any]]:
        keys = self._json(self._send("GET", "/v1/keys")).get("keys")
        return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []

    def revoke_key(self, key_id: str) -> None:
        self._send("DELETE", "/v1/keys/" + quote(key_id, safe=""))

    def set_secret(self, name: str, value: str) -> dict[str, Any]:
        path = "/v1/secrets/" + quote(name, safe="")
        return self._json(self._send("PUT", path, json={"value": value}))

    def list_secrets(self) -> list[dict[str, Any]]:
        found = self._json(self._send("GET", "/v1/secrets")).get("secrets")
        return [k for k in found if isinstance(k, dict)] if isinstance(found, list) else []

    def delete_secret(self, name: str) -> None:
        self._send("DELETE", "/v1/secrets/" + quote(name, safe=""))

    def delete_function(self, name: str) -> None:
        self._send("DELETE", _function_path(name))

    # -- invoke and logs -----------------------------------------------------

    def invoke(self, name: str, event: bytes) -> InvokeResponse:
        response = self._send(
            "POST",
            _function_path(name) + "/invoke",
            content=event,
            headers={"content-type": "application/json"},
            timeout=INVOKE_TIMEOUT,
        )
        return InvokeResponse(
            body=response.content,
            function_error=response.headers.get("x-nimbus-function-error"),
            request_id=response.headers.get("x-nimbus-request-id"),
        )

    def invoke_async(
        self, name: str, event: bytes, *, idempotency_key: str | None = None
    ) -> AsyncInvokeResponse:
        """Queue an invocation (``X-Nimbus-Invocation-Type: Event``); 202 once it is stored."""
        headers = {"content-type": "application/json", "x-nimbus-invocation-type": "Event"}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        response = self._send(
            "POST", _function_path(name) + "/invoke", content=event, headers=headers
        )
        invocation_id = response.headers.get("x-nimbus-invocation-id")
        if not invocation_id:
            raise CliError(
                f"Nimbus at {self.url} answered {response.status_code} without an invocation id"
            )
        return AsyncInvokeResponse(
            invocation_id, response.headers.get("x-nimbus-idempotent-replay") == "true"
        )

    # -- asynchronous invocations -----------------------------------------------

    def get_invocation(self, invocation_id: str) -> dict[str, Any]:
        return self._json(self._send("GET", _invocation_path(invocation_id)))

    def list_invocations(
        self, *, function: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, str] = {}
        if function is not None:
            params["function"] = function
        if status is not None:
            params["status"] = status
        if limit is not None:
            params["limit"] = str(limit)
        body = self._json(self._send("GET", "/v1/invocations", params=params))
        found = body.get("invocations")
        if not isinstance(found, list):
            raise CliError(f"Nimbus at {self.url} answered an unexpected list: {body!r:.200}")
        return [i for i in found if isinstance(i, dict)]

    def cancel_invocation(self, invocation_id: str) -> dict[str, Any]:
        return self._json(self._send("DELETE", _invocation_path(invocation_id)))

    def logs(
        self, name: str, *, since: str | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        params = _log_params(since=since, limit=limit)
        return self._json(self._send("GET", _function_path(name) + "/logs", params=params))

    def follow_logs(
        self, name: str, *, since: str | None = None, limit: int | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """Existing records, then new ones as they arrive, until the server closes the stream."""
        params = {**_log_params(since=since, limit=limit), "follow": "true"}
        path = _function_path(name) + "/logs"
        try:
            with self._http.stream("GET", path, params=params, timeout=FOLLOW_TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response, self.url)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise CliError(
                            f"Nimbus sent a log line that is not JSON: {line!r:.200}"
                        ) from None
                    if isinstance(record, dict):
                        yield record
        except httpx.HTTPError as e:
            raise _transport_error(e, self.url) from None

    # -- plumbing ------------------------------------------------------------

    def _upload(
        self,
        method: str,
        path: str,
        upload: Upload,
        on_progress: ProgressCallback | None,
        on_sent: Callable[[], None] | None,
        on_step: StepCallback | None = None,
    ) -> dict[str, Any]:
        # With a Content-Length httpx sends the stream as is, not chunked.
        headers = {"content-type": upload.content_type, "content-length": str(upload.size)}
        content = upload.chunks(on_progress, on_sent)
        if on_step is None:
            response = self._send(
                method, path, content=content, headers=headers, timeout=DEPLOY_TIMEOUT
            )
            return self._json(response)
        # The deploy's progress, a JSON object per line, then its result or its error.
        headers["accept"] = "application/x-ndjson"
        try:
            with self._http.stream(
                method, path, content=content, headers=headers, timeout=DEPLOY_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response, self.url)
                if "application/x-ndjson" not in response.headers.get("content-type", ""):
                    response.read()  # a server that does not stream: its plain answer
                    return self._json(response)
                for line in response.iter_lines():
                    event = _event(line)
                    if "result" in event and isinstance(event["result"], dict):
                        return event["result"]
                    if isinstance(event.get("error"), dict):
                        raise _error_of(event["error"], event.get("status"), self.url)
                    if isinstance(event.get("step"), str):
                        on_step(event["step"], str(event.get("message", "")))
        except httpx.HTTPError as e:
            raise _transport_error(e, self.url) from None
        raise CliError(f"Nimbus at {self.url} ended the deploy without saying how it went")

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise _transport_error(e, self.url) from None
        _raise_for_error(response, self.url)
        return response

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise CliError(
                f"Nimbus at {self.url} answered {response.status_code} with a body that is not "
                f"a JSON object: {response.text!r:.200}"
            )
        return body


def _function_path(name: str) -> str:
    return "/v1/functions/" + quote(name, safe="")


def _invocation_path(invocation_id: str) -> str:
    return "/v1/invocations/" + quote(invocation_id, safe="")


def _log_params(*, since: str | None, limit: int | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if since is not None:
        params["since"] = since
    if limit is not None:
        params["limit"] = str(limit)
    return params


def _event(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line) if line.strip() else {}
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


def _error_of(error: dict[str, Any], status: Any, url: str) -> CliError:
    """A streamed deploy's error line as the CliError its plain answer would raise."""
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"Nimbus at {url} failed the deploy"
    details = error.get("details")
    return CliError(
        message,
        code=error.get("code") if isinstance(error.get("code"), str) else None,
        status=status if isinstance(status, int) else None,
        details=details if isinstance(details, dict) else None,
    )


def _raise_for_error(response: httpx.Response, url: str) -> None:
    """Turn an API error response into a CliError carrying the API's own message."""
    if response.status_code < 400:
        return
    code: str | None = None
    message: str | None = None
    try:
        body = response.json()
    except ValueError:
        body = None
    details = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = error.get("message") if isinstance(error.get("message"), str) else None
        details = error.get("details") if isinstance(error.get("details"), dict) else None
    if not message:
        text = response.text.strip()
        message = f"Nimbus at {url} answered {response.status_code} {response.reason_phrase}"
        if text:
            message += f": {text[:200]}"
    retry_after = response.headers.get("retry-after")
    if response.status_code == 429 and retry_after:
        message += f" (retry after {retry_after} s)"
    raise CliError(message, code=code, status=response.status_code, details=details)


def _transport_error(error: httpx.HTTPError, url: str) -> CliError:
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return CliError(f"cannot reach Nimbus at {url}: is `nimbus up` running?")
    if isinstance(error, httpx.TimeoutException):
        return CliError(f"Nimbus at {url} did not answer in time")
    if isinstance(error, httpx.UnsupportedProtocol):
        return CliError(f"invalid Nimbus URL {url!r}: it must start with http:// or https://")
    detail = str(error) or type(error).__name__
    return CliError(f"lost the connection to Nimbus at {url}: {detail}")
