"""Ketch exceptions, one tree for the client, the model runtime and the broker.

    KetchError
     +-- Timeout              no answer within the client's own time limit
     +-- Unavailable          the broker cannot be reached
     +-- RequestError         the broker answered with an error; ``code`` is the wire code
          +-- ProtocolError   BAD_MESSAGE, UNSUPPORTED_VERSION, UNKNOWN_MESSAGE, TOO_LARGE
          +-- UnknownApp      UNKNOWN_APP
          +-- BadInput        BAD_INPUT
          +-- Overloaded      OVERLOADED (``retry_after_ms``)
          +-- DeadlineExceeded DEADLINE
          +-- ModelError      MODEL_ERROR
          +-- NoModel         NO_MODEL
          +-- Unauthorized    UNAUTHORIZED
          +-- ShuttingDown    SHUTTING_DOWN
          +-- InternalError   INTERNAL
          +-- NotFound        NOT_FOUND
          +-- Conflict        CONFLICT
          +-- Invalid         INVALID

``error_for_code`` maps a wire code back to its class; ``code_name`` is the inverse, so
an error crosses the wire as (code, "Class: message") and never as a traceback.
"""

from __future__ import annotations

from ketch.protocol import ErrorCode


class KetchError(Exception):
    """Base of every Ketch exception."""


class Timeout(KetchError):
    """No answer arrived within the client's time limit."""


class Unavailable(KetchError):
    """The broker cannot be reached."""


class RequestError(KetchError):
    """The broker or a model answered with an explicit error."""

    code: int = ErrorCode.INTERNAL

    def __init__(self, message: str, *, request_id: int = 0, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.retry_after_ms = retry_after_ms

    @property
    def code_name(self) -> str:
        return code_name(self.code)


class ProtocolError(RequestError):
    code = ErrorCode.BAD_MESSAGE


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownMessage(ProtocolError):
    code = ErrorCode.UNKNOWN_MESSAGE


class TooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class UnknownApp(RequestError):
    code = ErrorCode.UNKNOWN_APP


class BadInput(RequestError):
    code = ErrorCode.BAD_INPUT


class Overloaded(RequestError):
    code = ErrorCode.OVERLOADED


class DeadlineExceeded(RequestError):
    code = ErrorCode.DEADLINE


class ModelError(RequestError):
    code = ErrorCode.MODEL_ERROR


class NoModel(RequestError):
    code = ErrorCode.NO_MODEL


class Unauthorized(RequestError):
    code = ErrorCode.UNAUTHORIZED


class ShuttingDown(RequestError):
    code = ErrorCode.SHUTTING_DOWN


class InternalError(RequestError):
    code = ErrorCode.INTERNAL


class NotFound(RequestError):
    code = ErrorCode.NOT_FOUND


class Conflict(RequestError):
    code = ErrorCode.CONFLICT


class Invalid(RequestError):
    code = ErrorCode.INVALID


_BY_CODE: dict[int, type[RequestError]] = {}
for _cls in (
    ProtocolError,
    UnsupportedVersion,
    UnknownMessage,
    TooLarge,
    UnknownApp,
    BadInput,
    Overloaded,
    DeadlineExceeded,
    ModelError,
    NoModel,
    Unauthorized,
    ShuttingDown,
    InternalError,
    NotFound,
    Conflict,
    Invalid,
):
    _BY_CODE[_cls.code] = _cls

_NAMES = {v: k for k, v in vars(ErrorCode).items() if k.isupper()}


def error_for_code(code: int) -> type[RequestError]:
    return _BY_CODE.get(code, InternalError)


def code_name(code: int) -> str:
    return _NAMES.get(code, str(code))


def code_of_name(name: str) -> int:
    return getattr(ErrorCode, name.upper(), ErrorCode.INTERNAL)


def raise_for(code: int, message: str, **kw: int) -> RequestError:
    """The exception for a wire error (returned, so callers write ``raise raise_for(...)``)."""
    return error_for_code(code)(message, **kw)


def describe(exc: BaseException) -> str:
    """'Class: message', the only form in which an exception crosses the wire."""
    return f"{type(exc).__name__}: {exc}"
