"""AWS Signature Version 4, checked: how AWS's own clients (boto3, the AWS CLI) authenticate.

A signed request carries ``Authorization: AWS4-HMAC-SHA256 Credential=<key id>/<date>/
<region>/<service>/aws4_request, SignedHeaders=<names>, Signature=<hex>`` and
``X-Amz-Date``. :func:`verify` recomputes the signature from the request as received
(the canonical request: method, path, query, the signed headers, the body's sha256)
with the key's secret (:meth:`~nimbus.auth.keys.KeyRing.signing_secret`), compares in
constant time, and refuses a date more than 15 minutes off. The Lambda API (a later
part) calls it with the body it read; it needs nothing else of the request.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from nimbus.auth.keys import KeyRing, Principal
from nimbus.errors import Unauthorized

__all__ = ["ALGORITHM", "SignatureError", "is_sigv4", "verify"]

ALGORITHM = "AWS4-HMAC-SHA256"
#: How far a request's X-Amz-Date may be from the node's clock (AWS: 15 minutes).
MAX_SKEW = 15 * 60


class SignatureError(Unauthorized):
    """A SigV4 request that does not check out; ``aws_code`` is AWS's name for why."""

    def __init__(self, message: str, aws_code: str = "InvalidSignatureException") -> None:
        super().__init__(message)
        self.aws_code = aws_code


def is_sigv4(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"authorization":
            return value.startswith(ALGORITHM.encode())
    return False


def verify(
    method: str,
    raw_path: str,
    query_string: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    keys: KeyRing,
    *,
    now: float | None = None,
) -> Principal:
    """The principal of a SigV4-signed request, or :class:`SignatureError`."""
    fields = _headers(headers)
    auth = fields.get("authorization", [""])[0]
    credential, signed, signature = _parse(auth)
    key_id, date, region, service, terminal = (credential.split("/") + [""] * 5)[:5]
    if terminal != "aws4_request" or not (key_id and date and region and service):
        raise SignatureError(
            f"a malformed Credential: {credential!r}", "IncompleteSignatureException"
        )
    stamp = (fields.get("x-amz-date") or [""])[0]
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise SignatureError("X-Amz-Date is missing or not YYYYMMDD'T'HHMMSS'Z'") from None
    if stamp[:8] != date:
        raise SignatureError("the Credential's date is not X-Amz-Date's")
    if abs((time.time() if now is None else now) - when) > MAX_SKEW:
        raise SignatureError(
            "Signature expired: X-Amz-Date is more than 15 minutes from the server's time",
            "InvalidSignatureException",
        )
    found = keys.signing_secret(key_id)
    if found is None:
        raise SignatureError(
            "The security token included in the request is invalid", "UnrecognizedClientException"
        )
    principal, secret = found
    names = [n for n in signed.split(";") if n]
    if "host" not in names:
        raise SignatureError("the signed headers must include host")
    missing = [n for n in names if n not in fields]
    if missing:
        raise SignatureError(f"signed headers missing from the request: {', '.join(missing)}")
    # The body's hash is part of what is signed. A client may send its own (botocore
    # does for some services); it must then be the body's, or a captured signature would
    # carry another body. UNSIGNED-PAYLOAD (S3's streaming) is not accepted here.
    payload = hashlib.sha256(body).hexdigest()
    claimed = (fields.get("x-amz-content-sha256") or [""])[0]
    if claimed and claimed != payload:
        raise SignatureError(
            "X-Amz-Content-SHA256 is not the sha256 of the body received (an unsigned or "
            "altered payload)"
        )
    canonical = "\n".join(
        [
            method.upper(),
            _canonical_path(raw_path),
            _canonical_query(query_string),
            "".join(f"{n}:{','.join(' '.join(v.split()) for v in fields[n])}\n" for n in names),
            ";".join(names),
            payload,
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise SignatureError(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method."
        )
    return principal


def _headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def _parse(auth: str) -> tuple[str, str, str]:
    if not auth.startswith(ALGORITHM + " "):
        raise SignatureError("not a SigV4 Authorization header", "IncompleteSignatureException")
    parts = {}
    for item in auth[len(ALGORITHM) + 1 :].split(","):
        key, _, value = item.strip().partition("=")
        parts[key] = value
    try:
        return parts["Credential"], parts["SignedHeaders"], parts["Signature"]
    except KeyError as e:
        raise SignatureError(
            f"the Authorization header has no {e.args[0]}", "IncompleteSignatureException"
        ) from None


def _canonical_path(raw_path: str) -> str:
    """As AWS's clients compute it for every service but S3: the path as sent
    (percent-encoded), its ``.`` and ``..`` segments resolved, then encoded again."""
    path = raw_path or "/"
    normalized = posixpath.normpath(path)
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    if not normalized.startswith("/"):
        normalized = "/" + normalized
    return quote(normalized.replace("//", "/"), safe="/~")


def _canonical_query(query_string: str) -> str:
    pairs = []
    for pair in query_string.split("&") if query_string else []:
        key, _, value = pair.partition("=")
        pairs.append(
            (
                quote(unquote(key.replace("+", " ")), safe="-_.~"),
                quote(unquote(value.replace("+", " ")), safe="-_.~"),
            )
        )
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))
