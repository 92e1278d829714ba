"""The Python runtime shim: runs inside an instance, speaks the instance protocol.

This file runs with ``python -I -S`` and imports nothing but the standard
library: the function's own ``sys.path`` is its code and its dependency layer,
never Nimbus's environment. The server imports the wire constants from here too,
so the format has one definition.

Wire format (both directions, on the instance's own socket)::

    HEADER = >I B 16s d Q   body length, kind, request id (uuid bytes), seconds, number
    body   = raw bytes

    kind        direction   seconds             number          body
    SPEC        exec → inst 0                   0               {"env", "token"} JSON (forked
                                                                instances only: the first frame)
    READY       inst → exec init duration       1: restored     empty
                                                (a fork of an initialised function zygote;
                                                seconds: its after-restore hooks)
    INIT_ERROR  inst → exec init duration       0               Lambda error JSON
    INVOKE      exec → inst deadline (epoch)    length of the   the invocation: trace id, "\n",
                                                invocation      ARN, "\n", JSON of the rest
                                                                (client context, identity,
                                                                tenant) or nothing; then the
                                                                event
    RESULT      inst → exec handler duration    max RSS, KiB    result JSON
    ERROR       inst → exec handler duration    max RSS, KiB    Lambda error JSON

Output: fd 1 and 2 are one pipe read by the executor. After the init and after
each invocation the shim flushes and writes ``SENTINEL_PREFIX + token + b"\\n"``
so the executor can tell whose lines came before it — unless the pipe is empty
(the executor has read everything already): then the reply's kind carries
``QUIET`` and no sentinel is written, which saves a write, a read and a wake-up
on the hot path of functions that print nothing.

What the function meets is Lambda's Python runtime (``awslambdaric``): its
handler loading and error types, its root log handler and formats (Text or
JSON, ``AWS_LAMBDA_LOG_FORMAT``/``AWS_LAMBDA_LOG_LEVEL``), its error log lines,
``_X_AMZN_TRACE_ID`` per invocation, its ``context``, and SnapStart's runtime
hooks (``snapshot_restore_py``) around a function zygote's fork. Logging and
handler are set up once per process image: an instance forked from a function
zygote keeps exactly what the init configured.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">IB16sdQ")
READY, INIT_ERROR, INVOKE, RESULT, ERROR, SPEC = 1, 2, 3, 4, 5, 6
#: The ``errorType`` of a function zygote's INIT_ERROR when its init succeeded but left
#: what a fork cannot share (open files, threads): the version runs without one.
UNFORKABLE = "Nimbus.Unforkable"
#: Or'ed into the kind of a READY/RESULT/ERROR frame: no sentinel follows on the
#: output pipe, because the pipe was empty (everything written was already read).
QUIET = 0x80
SENTINEL_PREFIX = b"\x00\x1fnimbus-end:"
FIONREAD = 0x541B
#: The READY frame's number when the instance is a restored fork (no init of its own).
RESTORED = 1

#: Lambda's line terminator inside one multi-line error record, and its indent.
ERROR_LINE_TERMINATE = "\r"
ERROR_INDENT = "\u00a0"
_TEXT_FORMAT = "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n"
_JSON_DATE = "%Y-%m-%dT%H:%M:%SZ"

#: What this process image has set up (a fork inherits it): see :func:`serve`.
_READY: dict[str, Any] = {}
#: The invocation in progress, read by the log filter.
_CURRENT: dict[str, Any] = {"rid": "", "tenant": None}


def read_spec(fd: int) -> dict[str, object]:
    """Read the SPEC frame a forked instance gets first: its environment and token.

    They travel on the instance's own socket, never through the zygote, whose
    memory every later fork inherits: one function's secrets must never be
    readable in another's heap.
    """
    import json
    import os

    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, n)
            if not chunk:
                raise EOFError("the executor closed the socket before sending the spec")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    length, kind, _, _, _ = HEADER.unpack(exactly(HEADER.size))
    body = exactly(length)
    if kind != SPEC:
        raise ValueError(f"expected the instance spec first, got frame kind {kind}")
    spec: dict[str, object] = json.loads(body)
    return spec


def main(argv: list[str]) -> None:
    """``bootstrap.py <socket fd> <token>``: the exec'd entry point."""
    serve(int(argv[1]), argv[2].encode())


def serve(
    fd: int,
    token: bytes,
    *,
    init_only: bool = False,
    connect: Callable[[], tuple[int, bytes]] | None = None,
    forkable: Callable[[set[int]], str | None] | None = None,
) -> bool:
    """Initialise the handler and serve invocations on socket ``fd`` until it closes.

    Called by :func:`main`, or directly in a process forked from a zygote. With
    ``init_only`` (a function zygote), return after ``READY`` (True) or
    ``INIT_ERROR`` (False): its forks call this again, and find the handler (and the
    logging the init configured) as the init left them; they only run SnapStart's
    after-restore hooks. With ``connect`` (an instance made ahead of demand),
    everything up to the init is done first; ``connect()`` then waits for the
    instance's socket and token (``fd`` and ``token`` are not used). ``forkable(fds)``,
    after a successful init, says why the process must not be forked (an
    ``INIT_ERROR`` of type ``Nimbus.Unforkable`` then carries the reason), or None;
    ``fds`` are descriptors the shim renews in each fork itself (the init's asyncio event
    loops: see :func:`_track_event_loops`).
    """
    import array
    import fcntl
    import json
    import os
    import socket
    import sys
    import time
    import uuid

    restored = bool(_READY)
    if not restored:
        started = time.perf_counter()
        _prepare(os.environ)
        untrack = _track_event_loops() if init_only else None
        try:
            _READY["handler"], _READY["failed"] = _load(os.environ["_HANDLER"])
        finally:
            if untrack is not None:
                untrack()
        if _READY["failed"] is None and init_only:
            # SnapStart: the before-snapshot hooks run before the zygote is forked from.
            _READY["failed"] = _hooks("before")
            # What the init allocated stays put: forks share its pages, and their collector
            # never walks (and so never writes to, and copies) them.
            import gc

            gc.collect()
            gc.freeze()
        init_s = time.perf_counter() - started
    fn, failed = _READY["handler"], _READY["failed"]
    env = os.environ

    if connect is not None:
        fd, token = connect()
    if restored:
        # A fork of an initialised function zygote: its own event loops' descriptors, then
        # the after-restore hooks.
        started = time.perf_counter()
        _renew_event_loops()
        if failed is None:
            failed = _hooks("after")
        init_s = time.perf_counter() - started
    sentinel = SENTINEL_PREFIX + token + b"\n"
    sock = socket.socket(fileno=fd)
    rfile = sock.makefile("rb", buffering=65536)
    pending = array.array("i", [0])

    def end_of_output() -> int:
        """Flush; write the sentinel only if output is still in the pipe. The QUIET bit or 0."""
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            fcntl.ioctl(1, FIONREAD, pending, True)
            if pending[0] == 0:
                return QUIET
        except OSError:
            pass
        os.write(1, sentinel)
        return 0

    def send(kind: int, rid: bytes, seconds: float, number: int, body: bytes) -> None:
        sock.sendall(HEADER.pack(len(body), kind, rid, seconds, number) + body)

    # Peak RSS of *this* process image (VmHWM resets at exec, unlike ru_maxrss, which
    # would report the parent's size at fork). pread on a kept fd: one syscall.
    status_fd = -1 if init_only else os.open("/proc/self/status", os.O_RDONLY)

    def max_rss_kib() -> int:
        data = os.pread(status_fd, 4096, 0)
        at = data.find(b"VmHWM:")
        return int(data[at + 6 : data.index(b"kB", at)]) if at >= 0 else 0

    if failed is None and forkable is not None:
        reason = forkable(event_loop_fds())
        if reason is not None:
            failed = _error(UNFORKABLE, reason)

    if failed is not None:
        if failed["errorType"] != UNFORKABLE:
            log_error(failed)
        send(INIT_ERROR | end_of_output(), bytes(16), init_s, 0, json.dumps(failed).encode())
        return False
    assert fn is not None
    send(READY | end_of_output(), bytes(16), init_s, RESTORED if restored else 0, b"")
    if init_only:
        sock.detach()  # the socket stays open: its end tells the zygote to stop
        return True

    # -- invoke loop ------------------------------------------------------------
    hsize = HEADER.size
    # What the context reads from the environment, once: it is the instance's, fixed.
    base = tuple(env.get(k) for k in CONTEXT_ENV)
    while True:
        head = rfile.read(hsize)
        if len(head) < hsize:
            return True  # the executor closed our socket: we are done
        length, kind, rid_raw, deadline, meta_length = HEADER.unpack(head)
        body = rfile.read(length) if length else b""
        if kind != INVOKE:
            continue
        rid = str(uuid.UUID(bytes=rid_raw))
        head_text = body[:meta_length].decode() if meta_length else "\n\n"
        trace, arn, extra = head_text.split("\n", 2)
        meta = json.loads(extra) if extra else {}
        event_body = body[meta_length:]
        _CURRENT["rid"] = rid
        _CURRENT["tenant"] = meta.get("tenant")
        if trace:
            env["_X_AMZN_TRACE_ID"] = trace
        else:
            env.pop("_X_AMZN_TRACE_ID", None)
        t0 = time.perf_counter()
        out_kind = RESULT
        try:
            context = LambdaContext(
                rid,
                meta.get("client_context"),
                meta.get("identity"),
                deadline,
                arn,
                meta.get("tenant"),
                base,
            )
            event = json.loads(event_body) if event_body else {}
            result = fn(event, context)
            try:
                out = json.dumps(result, separators=(",", ":")).encode()
            except (TypeError, ValueError) as e:
                error = _error("Runtime.MarshalError", f"Unable to marshal response: {e}", rid=rid)
                out_kind, out = ERROR, json.dumps(error).encode()
                log_error(error)
        except Exception as e:
            error = _error(type(e).__name__, str(e), _frames(e.__traceback__), rid)
            out_kind, out = ERROR, json.dumps(error).encode()
            log_error(error)
        elapsed = time.perf_counter() - t0
        maxrss = max_rss_kib()
        _CURRENT["rid"] = ""
        send(out_kind | end_of_output(), rid_raw, elapsed, maxrss, out)


# -- set-up, once per process image ---------------------------------------------------


def _prepare(env: Any) -> None:
    """sys.path, unbuffered-enough stdio and Lambda's root log handler, before the init."""
    import os
    import sys

    task_root = env.get("LAMBDA_TASK_ROOT", os.getcwd())
    layer = env.get("NIMBUS_LAYER_ROOT", "")
    sys.path[:0] = [p for p in [task_root] + ([layer] if layer else []) if p not in sys.path]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    setup_logging(env.get("AWS_LAMBDA_LOG_FORMAT", ""), env.get("AWS_LAMBDA_LOG_LEVEL", ""))


def setup_logging(log_format: str, log_level: str) -> None:
    """The root handler Lambda's Python runtime installs: its text format (or JSON), its
    request id filter, UTC timestamps; the root level only when a level is configured
    (else Python's default, WARNING, as on Lambda)."""
    import sys
    import time

    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    handler = _LambdaHandler(sys.stdout)
    if log_format.upper() == "JSON":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT, "%Y-%m-%dT%H:%M:%S"))
    level = {"TRACE": "DEBUG", "WARN": "WARNING", "FATAL": "CRITICAL"}.get(
        log_level.upper(), log_level.upper()
    )
    if level in logging.getLevelNamesMapping():
        root.setLevel(level)
    handler.addFilter(_RequestIdFilter())
    root.addHandler(handler)
    _READY["json"] = log_format.upper() == "JSON"


def _load(spec: str) -> tuple[Callable[..., Any] | None, dict[str, Any] | None]:
    """The handler ``module.function`` (``dir/module.function`` too), or Lambda's init
    error for it: the same types and messages as Lambda's runtime."""
    import importlib
    import sys

    try:
        module_name, function_name = spec.rsplit(".", 1)
    except ValueError as e:
        return None, _error("Runtime.MalformedHandlerName", f"Bad handler '{spec}': {e}")
    try:
        if module_name.split(".")[0] in sys.builtin_module_names:
            return None, _error(
                "Runtime.BuiltInModuleConflict",
                f"Cannot use built-in module {module_name} as a handler module",
            )
        module = importlib.import_module(module_name.replace("/", "."))
    except ImportError as e:
        return None, _error(
            "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {e}"
        )
    except SyntaxError as e:
        return None, _error(
            "Runtime.UserCodeSyntaxError",
            f"Syntax error in module '{module_name}': {e}",
            [f'  File "{_shown(e.filename or "")}" Line {e.lineno}\n    {e.text}'],
        )
    except Exception as e:
        return None, _error(type(e).__name__, str(e), _frames(e.__traceback__))
    fn = getattr(module, function_name, None)
    if fn is None:
        return None, _error(
            "Runtime.HandlerNotFound",
            f"Handler '{function_name}' missing on module '{module_name}'",
        )
    if not callable(fn):
        return None, _error(
            "Runtime.HandlerNotFound",
            f"Handler '{function_name}' on module '{module_name}' is not callable",
        )
    return fn, None


def _track_event_loops() -> Callable[[], None]:
    """While a function zygote's init runs, remember every asyncio event loop it makes
    (Mangum makes one at import, as many libraries do): a fork must not share a loop's
    epoll instance and self-pipe with its siblings, so each fork renews them
    (:func:`_renew_event_loops`). Returns the function that stops tracking."""
    import asyncio.selector_events
    import weakref

    loops = _READY.setdefault("loops", weakref.WeakSet())
    cls = asyncio.selector_events.BaseSelectorEventLoop
    original = cls.__init__

    def init(self: Any, selector: Any = None) -> None:
        original(self, selector)
        loops.add(self)

    cls.__init__ = init  # type: ignore[method-assign]

    def untrack() -> None:
        cls.__init__ = original  # type: ignore[method-assign]

    return untrack


def _idle_loops() -> list[Any]:
    """The init's event loops that hold nothing but their own descriptors."""
    return [
        loop
        for loop in _READY.get("loops", ())
        if not loop.is_closed() and not loop.is_running() and len(loop._selector.get_map()) <= 1
    ]


def event_loop_fds() -> set[int]:
    """The descriptors of the init's idle event loops (a fork renews them)."""
    fds = set()
    for loop in _idle_loops():
        fds |= {loop._selector.fileno(), loop._ssock.fileno(), loop._csock.fileno()}
    return fds


def _renew_event_loops() -> None:
    """In a fork: each idle loop of the init gets an epoll instance and a self-pipe of its
    own (the inherited ones are the zygote's, shared by every sibling)."""
    import selectors

    for loop in _idle_loops():
        old = loop._selector
        loop._selector = selectors.DefaultSelector()
        old.close()  # this process's descriptor only: the zygote keeps its own
        loop._ssock.close()
        loop._csock.close()
        loop._internal_fds -= 1
        loop._make_self_pipe()


def _hooks(when: str) -> dict[str, Any] | None:
    """SnapStart's runtime hooks (``snapshot_restore_py``), when the init registered any:
    ``before`` the function zygote is forked from, ``after`` in each fork."""
    import sys

    hooks = sys.modules.get("snapshot_restore_py")
    if hooks is None:
        return None
    _READY["hooks"] = True
    try:
        if when == "before":
            callables = hooks.get_before_snapshot()
            while callables:  # in the reverse order of their registration, as Lambda
                func, args, kwargs = callables.pop()
                func(*args, **kwargs)
        else:
            for func, args, kwargs in hooks.get_after_restore():
                func(*args, **kwargs)
    except Exception as e:
        kind = "Runtime.BeforeSnapshotError" if when == "before" else "Runtime.AfterRestoreError"
        return _error(kind, f"{type(e).__name__}: {e}", _frames(e.__traceback__))
    return None


# -- errors ----------------------------------------------------------------------------


def _error(
    error_type: str, message: str, trace: list[str] | None = None, rid: str = ""
) -> dict[str, Any]:
    return {
        "errorMessage": message,
        "errorType": error_type,
        "requestId": rid,
        "stackTrace": trace or [],
    }


def _frames(tb: Any) -> list[str]:
    """The traceback as Lambda shows it, of the function's code only: from its first
    frame on (the runtime's and the import machinery's before it dropped), the
    interpreter's own files shown under ``/var/lang`` (as on Lambda), no host path."""
    import os
    import traceback

    frames = traceback.extract_tb(tb)
    roots = tuple(
        r.rstrip("/") + "/" for r in (os.environ.get("LAMBDA_TASK_ROOT", ""), "/opt") if r
    )
    first = next((i for i, f in enumerate(frames) if f.filename.startswith(roots)), 0)
    kept = [
        f
        for f in frames[first:]
        if not f.filename.startswith("<frozen ") and not f.filename.endswith("/bootstrap.py")
    ]
    for frame in kept:
        frame.filename = _shown(frame.filename)
    return traceback.format_list(kept)


def _shown(path: str) -> str:
    """``path`` as the function may see it: the runtime's prefix as ``/var/lang``."""
    import sys

    prefix = sys.base_prefix
    if prefix != "/var/lang" and path.startswith(prefix + "/"):
        return "/var/lang" + path[len(prefix) :]
    return path


def log_error(error: dict[str, Any]) -> None:
    """An error as Lambda's runtime logs it: one record (``\\r`` between its lines,
    indents as no-break spaces), or one JSON line with the JSON log format."""
    import json
    import sys
    import time

    if _READY.get("json"):
        record = {
            "timestamp": time.strftime(_JSON_DATE, time.gmtime()),
            "log_level": "ERROR",
            **error,
        }
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    head = "[ERROR]"
    if error.get("errorType"):
        head += " " + error["errorType"]
    if error.get("errorMessage"):
        head += (":" if error.get("errorType") else "") + " " + error["errorMessage"]
    lines = [head]
    trace = error.get("stackTrace")
    if trace:
        lines.append("Traceback (most recent call last):")
        for element in trace:
            for line in element.splitlines():
                stripped = line.lstrip(" ")
                lines.append(ERROR_INDENT * (len(line) - len(stripped)) + stripped)
    sys.stdout.write(ERROR_LINE_TERMINATE.join(lines) + "\n")


# -- logging ---------------------------------------------------------------------------


class _LambdaHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """One record, one line: as Lambda frames each record, a multi-line one (a
    traceback) stays one (its lines joined by ``\r``), and one whose format has no
    newline of its own still ends its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record).rstrip("\n").replace("\n", ERROR_LINE_TERMINATE)
            self.stream.write(msg + "\n")
        except Exception:
            self.handleError(record)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: Any) -> bool:
        record.aws_request_id = _CURRENT["rid"]
        record.tenant_id = _CURRENT["tenant"]
        return True


#: LogRecord attributes JsonFormatter does not copy into the record.
_RESERVED = frozenset(
    {
        "name", "msg", "args", "levelname", "levelno", "pathname", "filename", "module",
        "exc_info", "exc_text", "stack_info", "lineno", "funcName", "created", "msecs",
        "relativeCreated", "thread", "threadName", "processName", "process", "taskName",
        "aws_request_id", "tenant_id", "_frame_type",
    }
)  # fmt: skip


class JsonFormatter(logging.Formatter):
    """Lambda's JSON log format: ``timestamp``, ``level``, ``message``, ``logger``,
    ``requestId``, the exception's fields, and any ``extra`` the call passed."""

    def __init__(self) -> None:
        super().__init__(datefmt=_JSON_DATE)

    def format(self, record: Any) -> str:
        import json
        import traceback

        level = min(50, max(0, record.levelno)) // 10 * 10
        exc = record.exc_info
        result: dict[str, Any] = {
            "timestamp": self.formatTime(record, self.datefmt),
            "level": logging.getLevelName(level),
            "message": record.getMessage(),
            "logger": record.name,
            "stackTrace": traceback.format_tb(exc[2]) if exc else None,
            "errorType": exc[0].__name__ if exc else None,
            "errorMessage": str(exc[1]) if exc else None,
            "requestId": getattr(record, "aws_request_id", None),
            "location": f"{record.pathname}:{record.funcName}:{record.lineno}" if exc else None,
        }
        if getattr(record, "tenant_id", None) is not None:
            result["tenantId"] = record.tenant_id
        result.update(
            (k, v) for k, v in record.__dict__.items() if k not in _RESERVED and k not in result
        )
        result = {k: v for k, v in result.items() if v is not None}
        return json.dumps(result, ensure_ascii=False, default=str) + "\n"


# -- context ---------------------------------------------------------------------------


#: What ``context`` takes from the environment, in LambdaContext's order.
CONTEXT_ENV = (
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
)


class LambdaContext:
    """The ``context`` argument of a Lambda handler (awslambdaric's, field for field)."""

    def __init__(
        self,
        invoke_id: str,
        client_context: dict[str, Any] | None,
        cognito_identity: dict[str, Any] | None,
        deadline: float,
        invoked_function_arn: str,
        tenant_id: str | None = None,
        base: tuple[str | None, ...] | None = None,
    ) -> None:
        """``base``: the values of :data:`CONTEXT_ENV` (read from the environment when
        not given, as awslambdaric does on every invocation)."""
        if base is None:
            import os

            base = tuple(os.environ.get(k) for k in CONTEXT_ENV)
        self.aws_request_id = invoke_id
        (
            self.log_group_name,
            self.log_stream_name,
            self.function_name,
            self.memory_limit_in_mb,
            self.function_version,
        ) = base
        self.invoked_function_arn = invoked_function_arn
        self.tenant_id = tenant_id
        self.client_context = _from_dict(ClientContext, client_context)
        if self.client_context is not None:
            self.client_context.client = _from_dict(Client, self.client_context.client)
        identity = self.identity = CognitoIdentity()
        if cognito_identity is None:
            identity.cognito_identity_id = identity.cognito_identity_pool_id = None
        else:
            identity.cognito_identity_id = cognito_identity.get("cognitoIdentityId")
            identity.cognito_identity_pool_id = cognito_identity.get("cognitoIdentityPoolId")
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        import time

        return max(0, int((self._deadline - time.time()) * 1000))

    def log(self, msg: Any) -> None:
        import sys

        sys.stdout.write(str(msg))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(["
            f"aws_request_id={self.aws_request_id},"
            f"log_group_name={self.log_group_name},"
            f"log_stream_name={self.log_stream_name},"
            f"function_name={self.function_name},"
            f"memory_limit_in_mb={self.memory_limit_in_mb},"
            f"function_version={self.function_version},"
            f"invoked_function_arn={self.invoked_function_arn},"
            f"client_context={self.client_context},"
            f"identity={self.identity},"
            f"tenant_id={self.tenant_id}"
            "])"
        )


class CognitoIdentity:
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")
    cognito_identity_id: str | None
    cognito_identity_pool_id: str | None

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}([cognito_identity_id={self.cognito_identity_id},"
            f"cognito_identity_pool_id={self.cognito_identity_pool_id}])"
        )


class Client:
    __slots__ = (
        "app_package_name",
        "app_title",
        "app_version_code",
        "app_version_name",
        "installation_id",
    )


class ClientContext:
    __slots__ = ("client", "custom", "env")
    client: Any
    custom: Any
    env: Any


def _from_dict(cls: type, data: Any) -> Any:
    if data is None:
        return None
    obj = cls()
    for name in cls.__slots__:  # type: ignore[attr-defined]
        setattr(obj, name, data.get(name) if isinstance(data, dict) else None)
    return obj


if __name__ == "__main__":
    import sys

    main(sys.argv)
