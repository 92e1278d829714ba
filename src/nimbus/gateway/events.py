"""HTTP request → payload 2.0 event, and handler result → HTTP response.

Both directions follow Lambda function URLs (API Gateway HTTP API, payload format
2.0), so existing Lambda functions run unmodified:

* :func:`build_event` turns an ASGI ``http`` scope and its body into the JSON
  event the handler receives;
* :func:`build_response` turns the JSON the handler returned into status,
  headers and body. A result that cannot be mapped becomes a 502
  ``{"message": "Internal Server Error"}``, as API Gateway answers a malformed
  Lambda proxy response; it never raises.

Both run on every HTTP request, so they are plain functions over dicts and bytes:
no validation library, one ``orjson`` call each way, and a fast path that does not
parse the result at all when it cannot be a full response.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, TypedDict
from urllib.parse import parse_qsl

import orjson

__all__ = ["HttpEvent", "HttpResponse", "build_event", "build_response"]


# --------------------------------------------------------------------------- event


class HttpInfo(TypedDict):
    method: str
    path: str
    protocol: str
    sourceIp: str
    userAgent: str


class RequestContext(TypedDict):
    accountId: str
    apiId: str
    domainName: str
    domainPrefix: str
    http: HttpInfo
    requestId: str
    routeKey: str
    stage: str
    time: str
    timeEpoch: int


class HttpEvent(TypedDict):
    """The event a handler receives for an HTTP request (payload format 2.0)."""

    version: Literal["2.0"]
    routeKey: str
    rawPath: str
    rawQueryString: str
    cookies: NotRequired[list[str]]
    headers: dict[str, str]
    queryStringParameters: NotRequired[dict[str, str]]
    requestContext: RequestContext
    body: NotRequired[str]
    isBase64Encoded: bool


_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)

_TEXT_TYPES: Final = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-www-form-urlencoded",
    }
)


def build_event(
    scope: MutableMapping[str, Any],
    body: bytes,
    function_path: str,
    request_id: str,
    now: float,
    *,
    trace_id: str = "",
    prefix: str = "",
) -> bytes:
    """The payload 2.0 event for one HTTP request, JSON-encoded.

    ``function_path`` is the path inside the function (``"/"`` for
    ``/function/hello``), already percent-decoded; it is both ``rawPath`` and
    ``requestContext.http.path``. ``now`` is ``time.time()`` at arrival.

    As a function URL does, the headers gain ``x-forwarded-for`` (the client's
    address appended), ``x-forwarded-proto`` and ``x-forwarded-port`` (unless a proxy
    in front set them) and ``x-amzn-trace-id`` (``trace_id``). Under a path prefix
    (``/function/{name}``), ``x-forwarded-prefix`` tells the app where it is mounted.
    """
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for raw_name, raw_value in scope.get("headers", ()):
        # ASGI servers already lowercase names; bytes.lower() is cheap insurance.
        name = raw_name.lower().decode("latin-1")
        # Header values are opaque octets (RFC 9110 §5.5); latin-1 keeps every byte.
        value = raw_value.decode("latin-1")
        if name == "cookie":
            # Like Lambda: cookies go to their own list, not to headers. HTTP/2
            # clients may send several cookie headers; all are collected.
            cookies.extend(c for c in (p.strip() for p in value.split(";")) if c)
        elif name in headers:
            headers[name] += "," + value
        else:
            headers[name] = value

    client_ip = _client_ip(scope.get("client"))
    if client_ip:
        forwarded = headers.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{forwarded}, {client_ip}" if forwarded else client_ip
    if "x-forwarded-proto" not in headers:
        headers["x-forwarded-proto"] = scope.get("scheme", "http")
    if "x-forwarded-port" not in headers:
        server = scope.get("server")
        if server and server[1] is not None:
            headers["x-forwarded-port"] = str(server[1])
    if prefix:
        outer = headers.get("x-forwarded-prefix", "").rstrip("/")
        headers["x-forwarded-prefix"] = outer + prefix
    if trace_id:
        headers["x-amzn-trace-id"] = trace_id
    qs: bytes = scope.get("query_string", b"")
    raw_qs = qs.decode("latin-1")
    host = headers.get("host", "")
    event: HttpEvent = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": function_path,
        "rawQueryString": raw_qs,
        "headers": headers,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "nimbus",
            "domainName": host,
            "domainPrefix": _domain_prefix(host),
            "http": {
                "method": scope.get("method", "GET"),
                "path": function_path,
                "protocol": "HTTP/" + scope.get("http_version", "1.1"),
                "sourceIp": client_ip,
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": _clf_time(now),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    if qs:
        params: dict[str, str] = {}
        pairs: Iterable[tuple[str, str]]
        if b"%" in qs or b"+" in qs or not qs.isascii():
            # Percent-escapes are decoded as UTF-8 by parse_qsl; raw non-ASCII bytes
            # (which clients should not send, but do) are decoded as UTF-8 too,
            # rather than left as latin-1 mojibake. rawQueryString keeps the bytes.
            pairs = parse_qsl(qs.decode("utf-8", "replace"), keep_blank_values=True)
        else:
            # Nothing to unescape: what parse_qsl does, in a fifth of the time.
            # partition("=")[::2] is (key, value); a part without "=" has value "".
            pairs = (p.partition("=")[::2] for p in raw_qs.split("&") if p)
        for key, val in pairs:
            if key in params:
                params[key] += "," + val
            else:
                params[key] = val
        if params:
            event["queryStringParameters"] = params
    if body:
        text = _text_body(body, headers.get("content-type"))
        if text is None:
            event["body"] = base64.b64encode(body).decode("ascii")
            event["isBase64Encoded"] = True
        else:
            event["body"] = text
    return orjson.dumps(event)


def _text_body(body: bytes, content_type: str | None) -> str | None:
    """The body as a string if its type is textual and it is UTF-8, else None (base64)."""
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if not (
            media.startswith("text/")
            or media in _TEXT_TYPES
            or (media.startswith("application/") and media.endswith(("+json", "+xml")))
        ):
            return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _domain_prefix(host: str) -> str:
    """First label of the host, without the port: ``api`` for ``api.example.com:8080``."""
    if host.startswith("["):  # IPv6 literal: no labels to split
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0].partition(".")[0]


def _client_ip(client: Any) -> str:
    return str(client[0]) if client else ""


# (second, its formatted time): requests in the same second share the string.
_last_time: tuple[int, str] = (-1, "")


def _clf_time(now: float) -> str:
    """``now`` as ``10/Mar/2025:14:03:59 +0000``. Not strftime: ``%b`` follows the locale."""
    global _last_time
    second = int(now)
    last = _last_time  # one read: another thread may replace it, never half of it
    if last[0] == second:
        return last[1]
    year, month, day, hour, minute, sec = time.gmtime(second)[:6]
    text = f"{day:02d}/{_MONTHS[month - 1]}/{year:04d}:{hour:02d}:{minute:02d}:{sec:02d} +0000"
    _last_time = (second, text)
    return text


# ------------------------------------------------------------------------ response


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What to send back: ``headers`` are ready for ASGI ``http.response.start``.

    ``malformed`` is true when the handler's result could not be mapped and this is
    the 502 that replaces it; the caller logs it.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    malformed: bool = False


_CONTENT_TYPE_JSON: Final = (b"content-type", b"application/json")
_MALFORMED_BODY: Final = orjson.dumps({"message": "Internal Server Error"})
# RFC 9110 token. Checked before lowercasing: "\u212a".lower() is "k".
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# CR/LF would split the response; NUL is rejected by HTTP parsers.
_BAD_VALUE: Final = re.compile(r"[\r\n\x00]")
# The server frames the body; a function's own framing headers would contradict it.
_FRAMING_HEADERS: Final = frozenset({"content-length", "transfer-encoding"})


class _Malformed(Exception):
    """A full response that cannot be mapped (internal: becomes the 502)."""


def build_response(result: bytes) -> HttpResponse:
    """Map a handler's JSON result to an HTTP response, as Lambda function URLs do.

    * an object with ``statusCode``: a full response (``headers``, ``cookies``,
      ``body``, ``isBase64Encoded``);
    * a string: 200, the string as the body;
    * anything else: 200, the result itself as the body.

    Content type defaults to ``application/json``. Never raises: an unmappable
    result gives a 502 with ``malformed=True``.
    """
    # Fast path, no parsing. Results come from our runtime, which produced them
    # with json.dumps: they are valid JSON with no leading whitespace, and a
    # top-level "statusCode" key appears literally (json.dumps never escapes
    # ASCII letters). So a list, or an object without that byte string, is
    # returned as is. Only when we parse anyway do we detect invalid JSON.
    first = result[:1]
    if first == b"[" or (first == b"{" and b'"statusCode"' not in result):
        return HttpResponse(200, [_CONTENT_TYPE_JSON], result)
    try:
        doc = orjson.loads(result)
    except orjson.JSONDecodeError:
        return _malformed()
    if type(doc) is dict and "statusCode" in doc:
        try:
            return _full_response(doc)
        except _Malformed:
            return _malformed()
    if type(doc) is str:
        return HttpResponse(200, [_CONTENT_TYPE_JSON], doc.encode())
    # A statusCode nested deeper, a number, null, a bool: the result is the body.
    return HttpResponse(200, [_CONTENT_TYPE_JSON], result)


def _malformed() -> HttpResponse:
    return HttpResponse(502, [_CONTENT_TYPE_JSON], _MALFORMED_BODY, malformed=True)


def _full_response(doc: dict[str, Any]) -> HttpResponse:
    status = _status(doc["statusCode"])
    out: list[tuple[bytes, bytes]] = []
    has_type = False

    headers = doc.get("headers")
    if headers is not None:
        if type(headers) is not dict:
            raise _Malformed
        for name, value in headers.items():
            kind = type(value)
            if kind is str:
                text = value
            elif kind is bool:  # before int: JSON spells it true/false
                text = "true" if value else "false"
            elif kind is int or kind is float:
                text = str(value)
            elif value is None:
                continue
            else:
                raise _Malformed
            if not _HEADER_NAME.fullmatch(name):
                continue
            lname = name.lower()
            if lname in _FRAMING_HEADERS:
                continue
            encoded = _header_value(text)
            if encoded is None:
                continue
            if lname == "content-type":
                has_type = True
            out.append((lname.encode("ascii"), encoded))

    cookies = doc.get("cookies")
    if cookies is not None:
        if type(cookies) is not list:
            raise _Malformed
        for cookie in cookies:
            if type(cookie) is not str:
                raise _Malformed
            encoded = _header_value(cookie)
            if encoded is not None:
                out.append((b"set-cookie", encoded))

    if not has_type:
        out.append(_CONTENT_TYPE_JSON)
    return HttpResponse(status, out, _body(doc))


def _status(value: Any) -> int:
    kind = type(value)
    if kind is int:
        code: int = value
    elif (kind is str and value.isascii() and value.isdigit()) or (
        kind is float and value.is_integer()
    ):
        code = int(value)  # "200" and 200.0 are accepted, like a lenient JSON reader
    else:
        raise _Malformed
    # 1xx are interim responses: sent as the final one, the client would keep
    # waiting for the real response. So the range is 200-599, not 100-599.
    if not 200 <= code <= 599:
        raise _Malformed
    return code


def _header_value(text: str) -> bytes | None:
    """The value as bytes, or None to drop the header (CR/LF/NUL, or not latin-1)."""
    if _BAD_VALUE.search(text):
        return None
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return None


def _body(doc: dict[str, Any]) -> bytes:
    body = doc.get("body")
    if body is None:
        return b""
    if type(body) is not str:
        if doc.get("isBase64Encoded") is True:
            raise _Malformed
        return orjson.dumps(body)
    if doc.get("isBase64Encoded") is not True:
        return body.encode()
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        pass
    # base64.encodebytes() and most tools wrap lines every 76 characters.
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _Malformed from e
