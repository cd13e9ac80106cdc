"""Errors that carry their HTTP status, so one web handler answers them all and the core
raises them without knowing HTTP."""

from __future__ import annotations


class RelayError(Exception):
    status = 500
    logged = False  # True once the refusal is accounted for in the log (the web layer's concern)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RelayError):
    status = 400


class Unauthorized(RelayError):
    status = 401


class Forbidden(RelayError):
    status = 403


class NotFound(RelayError):
    status = 404


class Conflict(RelayError):
    status = 409


class PayloadTooLarge(RelayError):
    status = 413


class RateLimited(RelayError):
    status = 429

    def __init__(self, message: str, retry_after: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = dict(headers or {})  # RateLimit-* for a key's send limit


class NotConfigured(RelayError):
    status = 503


class StoreUnavailable(RelayError):
    status = 503
