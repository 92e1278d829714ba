"""Every error Nimbus raises on purpose, and its wire code.

The tree::

    NimbusError                      500 ServiceException (the root; also "anything else")
    ├── InvalidParameterValue        400 a bad spec, a bad zip, a bad query parameter
    │   ├── DependencyInstallError   400 pip could not install requirements.txt
    │   └── FunctionInitError        400 the new version's init failed: not published
    ├── Unauthorized                 401 no API key, or not a valid one
    ├── AccessDenied                 403 the key's scopes do not allow it
    ├── ResourceNotFound             404 no such function, invocation, route
    ├── ResourceConflict             409 the function already exists
    ├── RequestTooLarge              413 payload or upload over its limit
    ├── TooManyRequests              429 no instance free and the wait queue is full or timed out
    └── ServiceException             500 Nimbus itself failed

Errors *of a function* (its exceptions, timeouts, crashes, init failures) are
not exceptions here: they are results, in Lambda's error shape, built by
:mod:`nimbus.invoke`. The HTTP status of a ``NimbusError`` is chosen in one place,
at the edge (:func:`status_of`), and the body is always
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

from typing import Any


class NimbusError(Exception):
    """Root of every error Nimbus raises on purpose. ``code`` is the stable wire code."""

    code = "ServiceException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidParameterValue(NimbusError):
    code = "InvalidParameterValue"
    status = 400


class DependencyInstallError(InvalidParameterValue):
    """``pip install -r requirements.txt`` failed; the message carries pip's own words."""


class FunctionInitError(InvalidParameterValue):
    """A deploy's init failed (its module does not import, its handler is missing...):
    the version was not published. ``details`` is the error its first request would
    have got, in Lambda's shape (``errorType``, ``errorMessage``, ``stackTrace``)."""

    code = "FunctionInitError"

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        wire["error"]["details"] = self.details
        return wire


class Unauthorized(NimbusError):
    """No API key came with the request, or it is not a live key of this node."""

    code = "Unauthorized"
    status = 401


class AccessDenied(NimbusError):
    """The request's key is valid, but its scopes (or its tenant) do not allow this."""

    code = "AccessDenied"
    status = 403


class ResourceNotFound(NimbusError):
    code = "ResourceNotFound"
    status = 404


class ResourceConflict(NimbusError):
    code = "ResourceConflict"
    status = 409


class RequestTooLarge(NimbusError):
    code = "RequestTooLarge"
    status = 413


class CodeStorageExceeded(NimbusError):
    """Code and layers would take more than the node allows (Lambda's
    CodeStorageExceededException)."""

    code = "CodeStorageExceeded"
    status = 400


class IncompleteRequest(NimbusError):
    """The client went away before its request's body was all sent: nothing is run."""

    code = "IncompleteRequest"
    status = 400


class TooManyRequests(NimbusError):
    code = "TooManyRequests"
    status = 429

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServiceException(NimbusError):
    code = "ServiceException"
    status = 500


def status_of(error: NimbusError) -> int:
    """The HTTP status for an error: the one place where wire codes meet HTTP."""
    return error.status


def headers_of(error: NimbusError) -> dict[str, str]:
    if isinstance(error, TooManyRequests):
        return {"retry-after": str(error.retry_after)}
    if isinstance(error, Unauthorized):
        return {"www-authenticate": 'Bearer realm="nimbus"'}
    return {}
