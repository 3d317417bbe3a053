"""The one error taxonomy of the wire contract, and the exceptions that carry it."""

from __future__ import annotations

import enum
from typing import NamedTuple

from schemas import Error

from .redact import scrub


class _Row(NamedTuple):
    status: int
    retryable: bool


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
    UNAUTHORIZED = "UNAUTHORIZED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    NO_ROUTE = "NO_ROUTE"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    TIMEOUT = "TIMEOUT"
    INTERNAL = "INTERNAL"

    @property
    def status(self) -> int:
        return _TABLE[self].status

    @property
    def retryable(self) -> bool:
        return _TABLE[self].retryable


# Mirrors the table in docs/protocol.md ("Error codes"); a test keeps the two equal.
_TABLE: dict[ErrorCode, _Row] = {
    ErrorCode.INVALID_REQUEST: _Row(400, False),
    ErrorCode.CONTEXT_TOO_LONG: _Row(400, False),
    ErrorCode.UNAUTHORIZED: _Row(401, False),
    ErrorCode.BUDGET_EXCEEDED: _Row(402, False),
    ErrorCode.RATE_LIMITED: _Row(429, True),
    ErrorCode.NO_ROUTE: _Row(404, False),
    ErrorCode.PROVIDER_ERROR: _Row(502, True),
    ErrorCode.PROVIDER_UNAVAILABLE: _Row(503, True),
    ErrorCode.TIMEOUT: _Row(504, True),
    ErrorCode.INTERNAL: _Row(500, True),
}


class SwitchyardError(Exception):
    """An error with a wire code. Raised by the client; carried through the fleet."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def status(self) -> int:
        return self.code.status

    @property
    def retryable(self) -> bool:
        return self.code.retryable

    def to_reply(self, request_id: str, seq: int) -> Error:
        return Error(
            id=request_id,
            seq=seq,
            code=self.code.value,
            status=self.code.status,
            # Messages can quote a provider's words; never let a key-shaped string through.
            message=scrub(self.message),
            retryable=self.code.retryable,
            retry_after_ms=self.retry_after_ms,
        )

    @classmethod
    def from_reply(cls, reply: Error) -> SwitchyardError:
        try:
            code = ErrorCode(reply.code)
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(code, reply.message, retry_after_ms=reply.retry_after_ms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}, {self.message!r})"


class ProviderFailure(SwitchyardError):
    """A provider call failed. `retryable` here means: the same call may succeed if tried again.

    `credit_exhausted` marks a failure that concerns the whole provider (no credit left),
    which the router may act on for every pool of that provider.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry: bool,
        retry_after_ms: int | None = None,
        http_status: int | None = None,
        credit_exhausted: bool = False,
    ) -> None:
        super().__init__(code, message, retry_after_ms=retry_after_ms)
        self.retry = retry
        self.http_status = http_status
        self.credit_exhausted = credit_exhausted


class StreamBroken(ProviderFailure):
    """The provider's stream ended badly after it had started."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.PROVIDER_ERROR, message, retry=True)
