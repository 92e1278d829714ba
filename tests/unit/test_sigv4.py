"""SigV4 verification against AWS's own signer: every request here is signed by botocore
(what boto3 and the AWS CLI use), then checked by :func:`nimbus.auth.sigv4.verify`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from nimbus.auth import KeyRing
from nimbus.auth.crypto import NodeKey
from nimbus.auth.keys import MemoryKeyStore
from nimbus.auth.sigv4 import SignatureError, is_sigv4, verify

ENDPOINT = "http://127.0.0.1:8080"
Signed = tuple[str, str, str, list[tuple[bytes, bytes]], bytes]


@pytest.fixture
def keys() -> KeyRing:
    ring = KeyRing(MemoryKeyStore(), NodeKey(os.urandom(32)))
    asyncio.run(ring.open())
    return ring


def sign(
    key_id: str,
    secret: str,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    service: str = "lambda",
    region: str = "us-east-1",
) -> Signed:
    """What the server receives for a request botocore signed: the method, the raw
    (percent-encoded) path, the query string, the headers and the body."""
    request = AWSRequest(
        method=method, url=ENDPOINT + path, params=params, data=body, headers=headers
    )
    SigV4Auth(Credentials(key_id, secret), service, region).add_auth(request)
    prepared = request.prepare()
    url = urlsplit(prepared.url)
    sent = {k.lower(): v for k, v in prepared.headers.items()}
    sent.setdefault("host", url.netloc)  # what the HTTP client adds
    wire = [
        (k.encode(), (v if isinstance(v, str) else v.decode()).encode()) for k, v in sent.items()
    ]
    return method, url.path, url.query, wire, prepared.body or b""


def check(keys: KeyRing, signed: Signed, now: float | None = None) -> str:
    method, path, query, headers, body = signed
    return verify(method, path, query, headers, body, keys, now=now).key_id


@pytest.mark.parametrize(
    ("method", "path", "params", "body"),
    [
        ("GET", "/2015-03-31/functions/", None, b""),
        ("GET", "/2015-03-31/functions/", {"MaxItems": "50", "Marker": "a+b/c=d e"}, b""),
        (
            "POST",
            "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Ahello/invocations",
            {"Qualifier": "$LATEST"},
            b'{"name": "ada"}',
        ),
        ("PUT", "/2015-03-31/functions/hello/configuration", None, "é ü ✓".encode()),
        ("DELETE", "/2015-03-31/functions/hello", {"Qualifier": "3"}, b""),
        ("GET", "/2015-03-31/functions/hello%20world/./x/../", None, b""),
    ],
)
def test_botocore_signed_requests_verify(
    keys: KeyRing, method: str, path: str, params: dict[str, str] | None, body: bytes
) -> None:
    record, secret = asyncio.run(keys.create("aws", ["deploy", "invoke"]))
    signed = sign(record.key_id, secret, method, path, params=params, body=body)
    assert is_sigv4(signed[3])
    assert check(keys, signed) == record.key_id


def test_the_admin_key_signs_with_the_id_admin(keys: KeyRing) -> None:
    asyncio.run(keys.bootstrap_admin("the-admin-key-0123456789"))
    signed = sign("admin", "the-admin-key-0123456789", "GET", "/2015-03-31/functions/")
    assert check(keys, signed) == "admin"


def test_signed_extra_headers_are_checked(keys: KeyRing) -> None:
    record, secret = asyncio.run(keys.create("aws", ["invoke"]))
    headers = {"X-Amz-Invocation-Type": "Event", "X-Amz-Log-Type": "  Tail  "}
    signed = sign(record.key_id, secret, "POST", "/x", body=b"{}", headers=headers)
    assert check(keys, signed) == record.key_id
    method, path, query, wire, body = signed
    changed = [(k, b"RequestResponse" if k == b"x-amz-invocation-type" else v) for k, v in wire]
    with pytest.raises(SignatureError, match="does not match"):
        verify(method, path, query, changed, body, keys)


def _tampered(signed: Signed, what: str) -> Signed:
    method, path, query, headers, body = signed
    if what == "method":
        return "DELETE", path, query, headers, body
    if what == "path":
        return method, path.replace("hello", "other"), query, headers, body
    if what == "query":
        return method, path, query.replace("3", "4"), headers, body
    if what == "body":  # with botocore's own content hash, and without one
        return method, path, query, headers, body + b" "
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["method", "path", "query", "body"])
def test_any_change_to_a_signed_request_is_refused(keys: KeyRing, what: str) -> None:
    record, secret = asyncio.run(keys.create("aws", ["invoke"]))
    signed = sign(
        record.key_id,
        secret,
        "POST",
        "/fn/hello/invocations",
        params={"Qualifier": "3"},
        body=b'{"a": 1}',
    )
    assert check(keys, signed) == record.key_id
    with pytest.raises(SignatureError):
        check(keys, _tampered(signed, what))


def test_a_body_that_is_not_the_one_its_hash_names_is_refused(keys: KeyRing) -> None:
    record, secret = asyncio.run(keys.create("aws", ["invoke"]))
    signed = sign(
        record.key_id,
        secret,
        "POST",
        "/x",
        body=b"one",
        headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    )
    with pytest.raises(SignatureError, match="X-Amz-Content-SHA256"):
        check(keys, signed)


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        (lambda key_id, secret: (key_id, secret + "x"), "does not match"),
        (lambda key_id, secret: ("NIMBUNKNOWN", secret), "security token"),
    ],
)
def test_a_wrong_secret_or_unknown_key_is_refused(
    keys: KeyRing, who: Callable[[str, str], tuple[str, str]], expected: str
) -> None:
    record, secret = asyncio.run(keys.create("aws", ["read"]))
    signed = sign(*who(record.key_id, secret), "GET", "/2015-03-31/functions/")
    with pytest.raises(SignatureError, match=expected):
        check(keys, signed)


def test_a_revoked_key_no_longer_signs(keys: KeyRing) -> None:
    record, secret = asyncio.run(keys.create("aws", ["read"]))
    signed = sign(record.key_id, secret, "GET", "/2015-03-31/functions/")
    asyncio.run(keys.revoke(record.key_id))
    with pytest.raises(SignatureError) as refused:
        check(keys, signed)
    assert refused.value.aws_code == "UnrecognizedClientException"


def test_a_request_older_or_newer_than_fifteen_minutes_is_refused(keys: KeyRing) -> None:
    record, secret = asyncio.run(keys.create("aws", ["read"]))
    signed = sign(record.key_id, secret, "GET", "/2015-03-31/functions/")
    assert check(keys, signed, now=time.time() + 14 * 60) == record.key_id
    for now in (time.time() + 16 * 60, time.time() - 16 * 60):
        with pytest.raises(SignatureError, match="Signature expired"):
            check(keys, signed, now=now)


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        ("AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00", "no Credential"),
        (
            "AWS4-HMAC-SHA256 Credential=k/20261203/us-east-1/lambda, SignedHeaders=host, "
            "Signature=00",
            "malformed Credential",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=k/20261202/us-east-1/lambda/aws4_request, "
            "SignedHeaders=host, Signature=00",
            "date is not",
        ),
        ("Bearer nmb_x", "not a SigV4"),
    ],
)
def test_malformed_authorization_headers_get_a_reason(
    keys: KeyRing, authorization: str, expected: str
) -> None:
    headers = [(b"authorization", authorization.encode()), (b"x-amz-date", b"20261203T120000Z")]
    with pytest.raises(SignatureError, match=expected):
        verify("GET", "/", "", headers, b"", keys, now=1796299200.0)


def test_host_must_be_signed_and_signed_headers_present(keys: KeyRing) -> None:
    record, secret = asyncio.run(keys.create("aws", ["read"]))
    method, path, query, wire, body = sign(record.key_id, secret, "GET", "/x")
    auth = dict(wire)[b"authorization"]
    unsigned_host = auth.replace(b"SignedHeaders=host;", b"SignedHeaders=")
    headers = [(k, unsigned_host if k == b"authorization" else v) for k, v in wire]
    with pytest.raises(SignatureError, match="must include host"):
        verify(method, path, query, headers, body, keys)
    without_date = [(k, v) for k, v in wire if k != b"x-amz-date"]
    with pytest.raises(SignatureError, match="X-Amz-Date"):
        verify(method, path, query, without_date, body, keys)
