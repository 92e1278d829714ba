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
    READY       inst → exec init duration       0               empty
    INIT_ERROR  inst → exec init duration       0               Lambda error JSON
    INVOKE      exec → inst deadline (epoch)    0               event JSON
    RESULT      inst → exec handler duration    max RSS, KiB    result JSON
    ERROR       inst → exec handler duration    max RSS, KiB    Lambda error JSON

Output: fd 1 and 2 are one pipe read by the executor. After the init and after
each invocation the shim flushes and writes ``SENTINEL_PREFIX + token + b"\\n"``
so the executor can tell whose lines came before it — unless the pipe is empty
(the executor has read everything already): then the reply's kind carries
``QUIET`` and no sentinel is written, which saves a write, a read and a wake-up
on the hot path of functions that print nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

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
    forkable: Callable[[], str | None] | None = None,
) -> bool:
    """Initialise the handler and serve invocations on socket ``fd`` until it closes.

    Called by :func:`main`, or directly in a process forked from a zygote. With
    ``init_only`` (a function zygote), return after ``READY`` (True) or
    ``INIT_ERROR`` (False): its forks call this again, and find the handler's module
    already imported. With ``connect`` (an instance made ahead of demand), everything
    up to the init is done first; ``connect()`` then waits for the instance's
    socket and token (``fd`` and ``token`` are not used). ``forkable()``, after a
    successful init, says why the process must not be forked (an ``INIT_ERROR`` of
    type ``Nimbus.Unforkable`` then carries the reason), or None.
    """
    import array
    import fcntl
    import importlib
    import json
    import logging
    import os
    import socket
    import sys
    import time
    import traceback
    import uuid

    env = os.environ
    task_root = env.get("LAMBDA_TASK_ROOT", os.getcwd())
    layer = env.get("NIMBUS_LAYER_ROOT", "")
    sys.path[:0] = [p for p in [task_root] + ([layer] if layer else []) if p not in sys.path]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]

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

    def error_body(exc: BaseException, error_type: str | None = None, rid: str = "") -> bytes:
        tb = traceback.format_list(traceback.extract_tb(exc.__traceback__))
        doc = {
            "errorMessage": str(exc),
            "errorType": error_type or type(exc).__name__,
            "requestId": rid,
            "stackTrace": tb,
        }
        return json.dumps(doc).encode()

    current = {"rid": ""}

    def max_rss_kib() -> int:
        data = os.pread(status_fd, 4096, 0)
        at = data.find(b"VmHWM:")
        return int(data[at + 6 : data.index(b"kB", at)]) if at >= 0 else 0

    class _RequestIdFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.aws_request_id = current["rid"]
            return True

    handler_log = logging.StreamHandler(sys.stdout)
    handler_log.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    handler_log.formatter.converter = time.gmtime  # type: ignore[union-attr]
    handler_log.addFilter(_RequestIdFilter())
    root_logger = logging.getLogger()
    for old in [h for h in root_logger.handlers if getattr(h, "nimbus", False)]:
        root_logger.removeHandler(old)  # a function zygote's, inherited by this fork
    handler_log.nimbus = True  # type: ignore[attr-defined]
    root_logger.addHandler(handler_log)
    logging.getLogger().setLevel(logging.INFO)

    # -- init: import the handler module once --------------------------------
    spec = env["_HANDLER"]
    module_name, _, function_name = spec.rpartition(".")
    started = time.perf_counter()
    try:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            if isinstance(e, (ModuleNotFoundError, ImportError)):
                msg = f"Unable to import module '{module_name}': {e}"
                raise _InitError("Runtime.ImportModuleError", msg, e) from None
            raise _InitError(
                "Runtime.ImportModuleError",
                f"Unable to import module '{module_name}': {type(e).__name__}: {e}",
                e,
            ) from None
        fn = getattr(module, function_name, None)
        if fn is None:
            raise _InitError(
                "Runtime.HandlerNotFound",
                f"Handler '{function_name}' missing on module '{module_name}'",
                None,
            )
        if not callable(fn):
            raise _InitError(
                "Runtime.HandlerNotFound",
                f"Handler '{function_name}' on module '{module_name}' is not callable",
                None,
            )
    except _InitError as e:
        failed: _InitError | None = e
    else:
        failed = None
    init_s = time.perf_counter() - started

    if connect is not None:
        fd, token = connect()
    sentinel = SENTINEL_PREFIX + token + b"\n"
    sock = socket.socket(fileno=fd)
    rfile = sock.makefile("rb", buffering=65536)
    # Peak RSS of *this* process image (VmHWM resets at exec, unlike ru_maxrss, which
    # would report the parent's size at fork). pread on a kept fd: one syscall.
    status_fd = -1 if init_only else os.open("/proc/self/status", os.O_RDONLY)
    if failed is None and forkable is not None:
        reason = forkable()
        if reason is not None:
            failed = _InitError(UNFORKABLE, reason, None)

    if failed is not None:
        if failed.cause is not None:
            traceback.print_exception(failed.cause, file=sys.stderr)
        print(f"[ERROR] {failed.error_type}: {failed.message}", file=sys.stderr)
        body = json.dumps(
            {
                "errorMessage": failed.message,
                "errorType": failed.error_type,
                "requestId": "",
                "stackTrace": traceback.format_list(
                    traceback.extract_tb(failed.cause.__traceback__)
                )
                if failed.cause is not None
                else [],
            }
        ).encode()
        send(INIT_ERROR | end_of_output(), bytes(16), init_s, 0, body)
        return False
    assert fn is not None
    send(READY | end_of_output(), bytes(16), init_s, 0, b"")
    if init_only:
        sock.detach()  # the socket stays open: its end tells the zygote to stop
        return True

    # -- invoke loop ------------------------------------------------------------
    ctx_base = {
        "function_name": env.get("AWS_LAMBDA_FUNCTION_NAME", ""),
        "function_version": env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        "memory_limit_in_mb": env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        "log_group_name": env.get("AWS_LAMBDA_LOG_GROUP_NAME", ""),
        "log_stream_name": env.get("AWS_LAMBDA_LOG_STREAM_NAME", ""),
    }
    arn = "arn:aws:lambda:nimbus:000000000000:function:" + ctx_base["function_name"]
    hsize = HEADER.size
    while True:
        head = rfile.read(hsize)
        if len(head) < hsize:
            return True  # the executor closed our socket: we are done
        length, kind, rid_raw, deadline, _ = HEADER.unpack(head)
        body = rfile.read(length) if length else b""
        if kind != INVOKE:
            continue
        rid = str(uuid.UUID(bytes=rid_raw))
        current["rid"] = rid
        context = LambdaContext(rid, deadline, arn, ctx_base)
        t0 = time.perf_counter()
        try:
            event = json.loads(body) if body else {}
            result = fn(event, context)
            try:
                out = json.dumps(result, separators=(",", ":")).encode()
            except (TypeError, ValueError) as e:
                out_kind = ERROR
                out = json.dumps(
                    {
                        "errorMessage": f"Unable to marshal response: {e}",
                        "errorType": "Runtime.MarshalError",
                        "requestId": rid,
                        "stackTrace": [],
                    }
                ).encode()
                print(
                    f"[ERROR] Runtime.MarshalError: Unable to marshal response: {e}",
                    file=sys.stderr,
                )
            else:
                out_kind = RESULT
        except Exception as e:
            out_kind, out = ERROR, error_body(e, rid=rid)
            lines = traceback.format_exception(e)
            print(
                f"[ERROR] {type(e).__name__}: {e}\n" + "".join(lines).rstrip("\n"), file=sys.stderr
            )
        elapsed = time.perf_counter() - t0
        maxrss = max_rss_kib()
        current["rid"] = ""
        send(out_kind | end_of_output(), rid_raw, elapsed, maxrss, out)


class _InitError(Exception):
    def __init__(self, error_type: str, message: str, cause: BaseException | None) -> None:
        super().__init__(message)
        self.error_type, self.message, self.cause = error_type, message, cause


class LambdaContext:
    """The ``context`` argument of a Lambda handler."""

    __slots__ = (
        "_deadline",
        "aws_request_id",
        "client_context",
        "function_name",
        "function_version",
        "identity",
        "invoked_function_arn",
        "log_group_name",
        "log_stream_name",
        "memory_limit_in_mb",
    )

    def __init__(self, rid: str, deadline: float, arn: str, base: dict[str, str]) -> None:
        self.aws_request_id = rid
        self._deadline = deadline
        self.invoked_function_arn = arn
        self.function_name = base["function_name"]
        self.function_version = base["function_version"]
        self.memory_limit_in_mb = base["memory_limit_in_mb"]
        self.log_group_name = base["log_group_name"]
        self.log_stream_name = base["log_stream_name"]
        self.identity = None
        self.client_context = None

    def get_remaining_time_in_millis(self) -> int:
        import time

        return max(0, int((self._deadline - time.time()) * 1000))


if __name__ == "__main__":
    import sys

    main(sys.argv)
