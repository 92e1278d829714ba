"""functions-framework target serving the very same handler as bench/functions/hello.

``functions-framework --target hello --source bench/peer/ff_hello.py`` loads this file;
``hello(request)`` turns the Flask request into a minimal API Gateway payload 2.0 event,
calls ``handler(event, context)`` from bench/functions/hello/app.py, and maps the result
back the way Lambda function URLs do.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_APP = Path(__file__).resolve().parent.parent / "functions" / "hello" / "app.py"
_spec = importlib.util.spec_from_file_location("bench_hello_app", _APP)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
handler = _module.handler

_CONTEXT = SimpleNamespace(
    function_name="hello",
    function_version="1",
    memory_limit_in_mb=128,
    aws_request_id="",
    get_remaining_time_in_millis=lambda: 10_000,
)


def hello(request: Any) -> Any:
    body = request.get_data()
    try:
        text, is_b64 = body.decode(), False
    except UnicodeDecodeError:
        text, is_b64 = base64.b64encode(body).decode(), True
    event = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": request.path,
        "rawQueryString": request.query_string.decode(),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "queryStringParameters": dict(request.args) or None,
        "requestContext": {
            "http": {
                "method": request.method,
                "path": request.path,
                "sourceIp": request.remote_addr,
            }
        },
        "body": text,
        "isBase64Encoded": is_b64,
    }
    result = handler(event, _CONTEXT)
    if isinstance(result, dict) and "statusCode" in result:
        out = result.get("body") or ""
        if result.get("isBase64Encoded"):
            out = base64.b64decode(out)
        return out, int(result["statusCode"]), result.get("headers") or {}
    return json.dumps(result), 200, {"content-type": "application/json"}
