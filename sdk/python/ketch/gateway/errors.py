"""One table from Ketch errors to HTTP answers, and the JSON error body.

    exception                               status  body["code"]        note
    UnknownApp, NotFound                    404     UNKNOWN_APP, ...
    BadInput, Invalid, ProtocolError        400     BAD_INPUT, ...      the user's request is wrong
    TooLarge                                413     TOO_LARGE
    Unauthorized                            403     UNAUTHORIZED
    Conflict                                409     CONFLICT
    Overloaded                              503     OVERLOADED          Retry-After from retry_after_ms
    ShuttingDown, NoModel                   503     SHUTTING_DOWN, ...  Retry-After: 1
    Unavailable (broker not answering)      503     UNAVAILABLE         Retry-After: 1
    DeadlineExceeded                        504     DEADLINE            no answer in the SLO, no default
    Timeout (broker silent past the SLO)    504     TIMEOUT
    ModelError                              502     MODEL_ERROR         the model failed, not the gateway
    InternalError, anything else            500     INTERNAL            a bug: logged

Every error answer is ``{"error": "<message>", "code": "<CODE>"}`` (the Open Inference
Protocol asks for ``error``; ``code`` is Ketch's name for it), plus ``retry_after_ms`` when
the client should come back later.
"""

from __future__ import annotations

import math
from typing import Any

from ketch import errors

# most specific class first: the first match along an exception's MRO wins
STATUS: dict[type[BaseException], int] = {
    errors.TooLarge: 413,
    errors.UnknownApp: 404,
    errors.NotFound: 404,
    errors.BadInput: 400,
    errors.Invalid: 400,
    errors.ProtocolError: 400,
    errors.Unauthorized: 403,
    errors.Conflict: 409,
    errors.Overloaded: 503,
    errors.ShuttingDown: 503,
    errors.NoModel: 503,
    errors.Unavailable: 503,
    errors.DeadlineExceeded: 504,
    errors.Timeout: 504,
    errors.ModelError: 502,
    errors.InternalError: 500,
}

_RETRY_LATER = {503}


class HTTPError(Exception):
    """An answer other than 2xx, with a message a person can act on."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "",
        headers: dict[str, str] | None = None,
        retry_after_ms: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra = dict(extra or {})
        self.status = status
        self.message = message
        self.code = code or _DEFAULT_CODES.get(status, "ERROR")
        self.headers = dict(headers or {})
        self.retry_after_ms = retry_after_ms
        if retry_after_ms and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))

    def body(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"error": self.message, "code": self.code, **self.extra}
        if self.retry_after_ms:
            doc["retry_after_ms"] = self.retry_after_ms
        return doc


_DEFAULT_CODES = {
    400: "BAD_INPUT",
    401: "UNAUTHENTICATED",
    403: "UNAUTHORIZED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL",
    502: "MODEL_ERROR",
    503: "UNAVAILABLE",
    504: "TIMEOUT",
}


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message, code="BAD_INPUT")


def status_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def http_error_for(exc: BaseException) -> HTTPError:
    """The HTTP answer for a Ketch exception (or any exception: 500)."""
    if isinstance(exc, HTTPError):
        return exc
    status = status_for(exc)
    if isinstance(exc, errors.RequestError):
        code, message, retry = exc.code_name, exc.message, exc.retry_after_ms
    elif isinstance(exc, errors.Timeout):
        code, message, retry = "TIMEOUT", str(exc), 0
    elif isinstance(exc, errors.Unavailable):
        code, message, retry = "UNAVAILABLE", str(exc), 0
    else:
        code, message, retry = "INTERNAL", errors.describe(exc), 0
    if status in _RETRY_LATER and not retry:
        retry = 1000
    return HTTPError(status, message, code=code, retry_after_ms=retry)
