"""The pure HTTP ↔ payload 2.0 mapping (nimbus.gateway.events)."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from nimbus.gateway.events import HttpResponse, build_event, build_response

# 2025-03-10 14:03:59.123 UTC
NOW = 1741615439.123
MALFORMED_BODY = b'{"message":"Internal Server Error"}'
JSON_CT = (b"content-type", b"application/json")


def scope(
    *,
    method: str = "GET",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] | None = ("203.0.113.7", 51234),
    http_version: str = "1.1",
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/function/hello/a/b",
        "raw_path": b"/function/hello/a/b",
        "query_string": query,
        "headers": [(b"host", b"api.example.com")] if headers is None else headers,
        "client": client,
        "scheme": "http",
        "http_version": http_version,
    }


def event(
    sc: dict[str, Any] | None = None, body: bytes = b"", path: str = "/a/b"
) -> dict[str, Any]:
    raw = build_event(scope() if sc is None else sc, body, path, "req-1", NOW)
    assert isinstance(raw, bytes)
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


# ----------------------------------------------------------------------------- event


def test_event_shape() -> None:
    ev = event(
        scope(
            method="POST",
            headers=[(b"host", b"api.example.com"), (b"user-agent", b"curl/8.5.0")],
            http_version="2",
        )
    )
    assert ev == {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/a/b",
        "rawQueryString": "",
        "headers": {
            "host": "api.example.com",
            "user-agent": "curl/8.5.0",
            "x-forwarded-for": "203.0.113.7",
            "x-forwarded-proto": "http",
        },
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "nimbus",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {
                "method": "POST",
                "path": "/a/b",
                "protocol": "HTTP/2",
                "sourceIp": "203.0.113.7",
                "userAgent": "curl/8.5.0",
            },
            "requestId": "req-1",
            "routeKey": "$default",
            "stage": "$default",
            "time": "10/Mar/2025:14:03:59 +0000",
            "timeEpoch": 1741615439123,
        },
        "isBase64Encoded": False,
    }


def test_root_path() -> None:
    ev = event(path="/")
    assert ev["rawPath"] == "/"
    assert ev["requestContext"]["http"]["path"] == "/"


def test_time_is_utc_with_zero_padded_day() -> None:
    raw = build_event(scope(), b"", "/", "r", 1704067200.999)  # 2024-01-01 00:00:00.999 UTC
    ctx = orjson.loads(raw)["requestContext"]
    assert ctx["time"] == "01/Jan/2024:00:00:00 +0000"
    assert ctx["timeEpoch"] == 1704067200999
    assert isinstance(ctx["timeEpoch"], int)


def test_time_month_names_are_english_and_complete() -> None:
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    for i, name in enumerate(months):
        ts = 1704067200 + i * 32 * 86400  # lands in month i+1 of 2024
        ctx = orjson.loads(build_event(scope(), b"", "/", "r", ts))["requestContext"]
        assert ctx["time"].split("/")[1] == name


def test_time_follows_now_across_seconds() -> None:
    times = [1704067200.0, 1704067200.9, 1704067201.0, 1704067199.5, 1741615439.123]
    got = [
        orjson.loads(build_event(scope(), b"", "/", "r", t))["requestContext"]["time"]
        for t in times
    ]
    assert got == [
        "01/Jan/2024:00:00:00 +0000",
        "01/Jan/2024:00:00:00 +0000",
        "01/Jan/2024:00:00:01 +0000",
        "31/Dec/2023:23:59:59 +0000",
        "10/Mar/2025:14:03:59 +0000",
    ]


def test_query_string_repeated_keys_and_blank_values() -> None:
    ev = event(scope(query=b"a=1&b=&a=2&c&d=x%20y+z&e=%C3%A9"))
    assert ev["rawQueryString"] == "a=1&b=&a=2&c&d=x%20y+z&e=%C3%A9"
    assert ev["queryStringParameters"] == {"a": "1,2", "b": "", "c": "", "d": "x y z", "e": "é"}


@pytest.mark.parametrize(
    "query",
    [
        "a=1&b=2",
        "a",
        "a&b",
        "a=&=b",
        "=",
        "a=b=c",
        "&a=1&&b=2&",
        "a=1;b=2",
        "x=1&x=&x=3",
        "a=%41&a=A",
        "a+b=c+d",
        "k=%zz&k=%e9",
        "%3D=%26",
    ],
)
def test_query_parameters_match_parse_qsl(query: str) -> None:
    # The event parses unescaped query strings without parse_qsl: same result.
    expected: dict[str, str] = {}
    for key, val in parse_qsl(query, keep_blank_values=True):
        expected[key] = expected[key] + "," + val if key in expected else val
    ev = event(scope(query=query.encode()))
    assert ev.get("queryStringParameters", {}) == expected


def test_no_query_string_omits_parameters() -> None:
    ev = event(scope(query=b""))
    assert ev["rawQueryString"] == ""
    assert "queryStringParameters" not in ev


def test_query_string_with_only_separators_omits_parameters() -> None:
    ev = event(scope(query=b"&&"))
    assert ev["rawQueryString"] == "&&"
    assert "queryStringParameters" not in ev


def test_raw_non_ascii_query_bytes() -> None:
    ev = event(scope(query="q=é".encode()))
    assert ev["rawQueryString"] == "q=Ã©"  # the bytes as they came, latin-1
    assert ev["queryStringParameters"] == {"q": "é"}


def test_cookies_are_split_and_removed_from_headers() -> None:
    ev = event(
        scope(
            headers=[
                (b"host", b"h"),
                (b"cookie", b"a=1; b=2"),
                (b"cookie", b"c=3"),  # HTTP/2 clients may split cookies
            ]
        )
    )
    assert ev["cookies"] == ["a=1", "b=2", "c=3"]
    assert "cookie" not in ev["headers"]


def test_cookies_without_space_after_separator() -> None:
    ev = event(scope(headers=[(b"cookie", b"a=1;b=2;")]))
    assert ev["cookies"] == ["a=1", "b=2"]


def test_proxy_headers_as_a_function_url_adds_them() -> None:
    sc = scope(headers=[(b"host", b"h"), (b"x-forwarded-for", b"198.51.100.1")])
    sc["server"] = ("127.0.0.1", 8080)
    raw = build_event(
        sc, b"", "/docs", "req-1", NOW, trace_id="Root=1-abc-def", prefix="/function/app"
    )
    headers = orjson.loads(raw)["headers"]
    assert headers["x-forwarded-for"] == "198.51.100.1, 203.0.113.7"  # appended, not replaced
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-port"] == "8080"
    assert headers["x-forwarded-prefix"] == "/function/app"
    assert headers["x-amzn-trace-id"] == "Root=1-abc-def"
    assert orjson.loads(raw)["rawPath"] == "/docs"


def test_a_proxy_in_front_keeps_its_scheme_port_and_prefix() -> None:
    sc = scope(
        headers=[
            (b"host", b"h"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-port", b"443"),
            (b"x-forwarded-prefix", b"/faas/"),
        ]
    )
    sc["server"] = ("127.0.0.1", 8080)
    headers = orjson.loads(build_event(sc, b"", "/", "r", NOW, prefix="/function/x"))["headers"]
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-port"] == "443"
    assert headers["x-forwarded-prefix"] == "/faas/function/x"


def test_no_cookies_omits_list() -> None:
    assert "cookies" not in event()
    assert "cookies" not in event(scope(headers=[(b"cookie", b"")]))


def test_repeated_headers_joined_and_names_lowercased() -> None:
    ev = event(
        scope(
            headers=[
                (b"Host", b"h"),
                (b"X-Multi", b"one"),
                (b"x-multi", b"two"),
                (b"accept", b"text/html, application/json"),
            ]
        )
    )
    assert ev["headers"] == {
        "host": "h",
        "x-multi": "one,two",
        "accept": "text/html, application/json",
        "x-forwarded-for": "203.0.113.7",
        "x-forwarded-proto": "http",
    }


def test_header_values_keep_every_byte() -> None:
    ev = event(scope(headers=[(b"x-raw", b"\xe9\xff")]))
    assert ev["headers"]["x-raw"] == "\xe9\xff"


@pytest.mark.parametrize(
    ("host", "prefix"),
    [
        ("api.example.com", "api"),
        ("localhost", "localhost"),
        ("localhost:8080", "localhost"),
        ("fn.nimbus.local:8080", "fn"),
        ("127.0.0.1:8080", "127"),
        ("[::1]:8080", "[::1]"),
        ("", ""),
    ],
)
def test_domain_name_and_prefix(host: str, prefix: str) -> None:
    headers = [(b"host", host.encode())] if host else []
    ctx = event(scope(headers=headers))["requestContext"]
    assert ctx["domainName"] == host
    assert ctx["domainPrefix"] == prefix


def test_missing_client_and_user_agent() -> None:
    http = event(scope(client=None, headers=[]))["requestContext"]["http"]
    assert http["sourceIp"] == ""
    assert http["userAgent"] == ""


def test_empty_body_is_omitted() -> None:
    ev = event(scope(headers=[(b"content-type", b"application/octet-stream")]), body=b"")
    assert "body" not in ev
    assert ev["isBase64Encoded"] is False


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        b"text/plain",
        b"text/html; charset=utf-8",
        b"application/json",
        b"Application/JSON; charset=UTF-8",
        b"application/vnd.api+json",
        b"application/xml",
        b"application/atom+xml",
        b"application/javascript",
        b"application/x-www-form-urlencoded",
    ],
)
def test_textual_body_is_a_string(content_type: bytes | None) -> None:
    headers = [] if content_type is None else [(b"content-type", content_type)]
    body = '{"name": "zoë"}'.encode()
    ev = event(scope(headers=headers), body=body)
    assert ev["body"] == '{"name": "zoë"}'
    assert ev["isBase64Encoded"] is False


@pytest.mark.parametrize(
    "content_type",
    [b"image/png", b"application/octet-stream", b"application/pdf", b"multipart/form-data"],
)
def test_binary_content_type_is_base64_even_if_utf8(content_type: bytes) -> None:
    body = b"plain ascii"
    ev = event(scope(headers=[(b"content-type", content_type)]), body=body)
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"], validate=True) == body


def test_png_body_is_base64() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    ev = event(scope(headers=[(b"content-type", b"image/png")]), body=png)
    assert ev["isBase64Encoded"] is True
    assert ev["body"] == base64.b64encode(png).decode()


def test_textual_type_but_not_utf8_is_base64() -> None:
    body = "café".encode("latin-1")
    ev = event(scope(headers=[(b"content-type", b"text/plain; charset=latin-1")]), body=body)
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == body


def test_no_content_type_binary_is_base64() -> None:
    ev = event(scope(headers=[]), body=b"\xff\xfe\x00")
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == b"\xff\xfe\x00"


def test_absent_optional_fields() -> None:
    ev = event()
    for key in ("pathParameters", "stageVariables", "cookies", "queryStringParameters", "body"):
        assert key not in ev


# -------------------------------------------------------------------------- response


def test_full_response() -> None:
    result = orjson.dumps(
        {
            "statusCode": 201,
            "headers": {"Content-Type": "text/plain", "X-Custom": "v"},
            "cookies": ["a=1; Path=/", "b=2; HttpOnly"],
            "body": "created",
        }
    )
    resp = build_response(result)
    assert resp == HttpResponse(
        201,
        [
            (b"content-type", b"text/plain"),
            (b"x-custom", b"v"),
            (b"set-cookie", b"a=1; Path=/"),
            (b"set-cookie", b"b=2; HttpOnly"),
        ],
        b"created",
    )
    assert resp.malformed is False


def test_full_response_defaults() -> None:
    resp = build_response(b'{"statusCode":204}')
    assert resp == HttpResponse(204, [JSON_CT], b"")


def test_full_response_base64_body() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    result = orjson.dumps(
        {
            "statusCode": 200,
            "headers": {"content-type": "image/png"},
            "body": base64.b64encode(png).decode(),
            "isBase64Encoded": True,
        }
    )
    resp = build_response(result)
    assert resp.status == 200
    assert resp.body == png
    assert resp.headers == [(b"content-type", b"image/png")]


def test_full_response_base64_with_line_breaks() -> None:
    data = bytes(range(256))
    result = orjson.dumps(
        {"statusCode": 200, "body": base64.encodebytes(data).decode(), "isBase64Encoded": True}
    )
    assert build_response(result).body == data


def test_full_response_not_base64_when_flag_false() -> None:
    result = orjson.dumps({"statusCode": 200, "body": "aGVsbG8=", "isBase64Encoded": False})
    assert build_response(result).body == b"aGVsbG8="


def test_full_response_utf8_body() -> None:
    resp = build_response(orjson.dumps({"statusCode": 200, "body": "zoë ✓"}))
    assert resp.body == "zoë ✓".encode()


def test_full_response_non_string_header_values() -> None:
    result = orjson.dumps(
        {
            "statusCode": 200,
            "headers": {"x-int": 42, "x-float": 1.5, "x-true": True, "x-false": False, "x-n": None},
        }
    )
    resp = build_response(result)
    assert resp.headers == [
        (b"x-int", b"42"),
        (b"x-float", b"1.5"),
        (b"x-true", b"true"),
        (b"x-false", b"false"),
        JSON_CT,
    ]


def test_full_response_non_string_body_is_json_encoded() -> None:
    resp = build_response(orjson.dumps({"statusCode": 200, "body": {"a": [1, 2]}}))
    assert resp.status == 200
    assert orjson.loads(resp.body) == {"a": [1, 2]}


def test_full_response_multi_value_headers_ignored() -> None:
    result = orjson.dumps({"statusCode": 200, "multiValueHeaders": {"x-a": ["1", "2"]}})
    assert build_response(result).headers == [JSON_CT]


def test_full_response_content_type_detected_case_insensitively() -> None:
    resp = build_response(orjson.dumps({"statusCode": 200, "headers": {"CONTENT-TYPE": "a/b"}}))
    assert resp.headers == [(b"content-type", b"a/b")]


def test_full_response_framing_headers_dropped() -> None:
    result = orjson.dumps(
        {
            "statusCode": 200,
            "headers": {"Content-Length": "999", "Transfer-Encoding": "chunked"},
            "body": "hi",
        }
    )
    assert build_response(result).headers == [JSON_CT]


@pytest.mark.parametrize(
    ("status", "expected"), [(200, 200), (599, 599), ("404", 404), (302.0, 302)]
)
def test_status_code_forms(status: object, expected: int) -> None:
    assert build_response(orjson.dumps({"statusCode": status})).status == expected


def test_header_injection_dropped() -> None:
    result = orjson.dumps(
        {
            "statusCode": 200,
            "headers": {
                "x-ok": "fine",
                "x-crlf": "a\r\nset-cookie: evil=1",
                "x-lf": "a\nb",
                "x-nul": "a\x00b",
                "bad name": "v",
                "x-bad:name": "v",
                "x-nl\r\n": "v",
                "\u212a": "kelvin sign lowercases to k",
                "x-euro": "€",  # not latin-1
            },
            "cookies": ["a=1", "b=2\r\nx-evil: 1"],
        }
    )
    resp = build_response(result)
    assert resp.status == 200
    assert resp.malformed is False
    assert resp.headers == [(b"x-ok", b"fine"), (b"set-cookie", b"a=1"), JSON_CT]


def test_latin1_header_value_kept() -> None:
    resp = build_response(orjson.dumps({"statusCode": 200, "headers": {"x-name": "café"}}))
    assert resp.headers[0] == (b"x-name", "café".encode("latin-1"))


def test_string_result() -> None:
    resp = build_response(orjson.dumps("hello ✓"))
    assert resp == HttpResponse(200, [JSON_CT], "hello ✓".encode())


def test_dict_without_status_code_is_returned_unchanged() -> None:
    result = b'{"message":"hi","n":1}'
    resp = build_response(result)
    assert resp.status == 200
    assert resp.headers == [JSON_CT]
    assert resp.body is result


def test_nested_status_code_is_not_a_full_response() -> None:
    result = b'{"data":{"statusCode":404}}'
    resp = build_response(result)
    assert (resp.status, resp.body, resp.malformed) == (200, result, False)
    assert resp.body is result


def test_status_code_inside_a_string_value() -> None:
    result = b'{"text":"\\"statusCode\\""}'
    resp = build_response(result)
    assert (resp.status, resp.body, resp.malformed) == (200, result, False)


def test_list_result_unchanged() -> None:
    result = b'[1,{"statusCode":500}]'
    resp = build_response(result)
    assert (resp.status, resp.headers, resp.malformed) == (200, [JSON_CT], False)
    assert resp.body is result


@pytest.mark.parametrize("result", [b"null", b"42", b"-1.5e3", b"true", b"false"])
def test_scalar_results_unchanged(result: bytes) -> None:
    resp = build_response(result)
    assert (resp.status, resp.headers, resp.malformed) == (200, [JSON_CT], False)
    assert resp.body is result


def test_headers_list_is_fresh_per_response() -> None:
    a = build_response(b"{}")
    a.headers.append((b"x-request-id", b"1"))
    assert build_response(b"{}").headers == [JSON_CT]
    b = build_response(b"not json")
    b.headers.append((b"x-request-id", b"1"))
    assert build_response(b"not json").headers == [JSON_CT]


def assert_malformed(resp: HttpResponse) -> None:
    assert resp.status == 502
    assert resp.headers == [JSON_CT]
    assert resp.body == MALFORMED_BODY
    assert resp.malformed is True


@pytest.mark.parametrize(
    "status",
    [
        None,
        "abc",
        "",
        " 200",
        "\uff12\uff10\uff10",
        99,
        100,
        101,
        199,
        600,
        1000,
        -200,
        200.5,
        True,
        [200],
        {},
    ],
)
def test_bad_status_code(status: object) -> None:
    assert_malformed(build_response(orjson.dumps({"statusCode": status, "body": "x"})))


def test_bad_base64() -> None:
    result = orjson.dumps({"statusCode": 200, "body": "not base64!!", "isBase64Encoded": True})
    assert_malformed(build_response(result))


def test_bad_base64_padding() -> None:
    result = orjson.dumps({"statusCode": 200, "body": "aGVsbG8", "isBase64Encoded": True})
    assert_malformed(build_response(result))


def test_base64_non_string_body() -> None:
    result = orjson.dumps({"statusCode": 200, "body": {"a": 1}, "isBase64Encoded": True})
    assert_malformed(build_response(result))


@pytest.mark.parametrize(
    "doc",
    [
        {"statusCode": 200, "headers": "x-a: 1"},
        {"statusCode": 200, "headers": ["x-a", "1"]},
        {"statusCode": 200, "headers": {"x-a": ["1", "2"]}},
        {"statusCode": 200, "headers": {"x-a": {"v": 1}}},
        {"statusCode": 200, "cookies": "a=1"},
        {"statusCode": 200, "cookies": [1]},
        {"statusCode": 200, "cookies": [None]},
    ],
)
def test_malformed_full_responses(doc: dict[str, Any]) -> None:
    assert_malformed(build_response(orjson.dumps(doc)))


def test_null_headers_and_cookies_are_absent() -> None:
    resp = build_response(b'{"statusCode":200,"headers":null,"cookies":null,"body":null}')
    assert resp == HttpResponse(200, [JSON_CT], b"")


@pytest.mark.parametrize(
    "result",
    [
        b"",
        b"not json",
        b"NaN",
        b'{"statusCode":200,',
        b'{"statusCode":200} trailing',
        b'"unterminated',
        b"\xff\xfe",
    ],
)
def test_invalid_json(result: bytes) -> None:
    assert_malformed(build_response(result))


def test_leading_whitespace_is_parsed() -> None:
    assert build_response(b' {"statusCode":418}').status == 418
    assert build_response(b' "s"').body == b"s"
