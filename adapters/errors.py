"""Domain errors. Each carries a `message` written for the caller, saying what to do about it.

The service maps each class to a gRPC status code in one table (service/errors.py).
"""

from __future__ import annotations


class HeadserveError(Exception):
    """Base of every error a caller may see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(HeadserveError):
    """The request itself is wrong: bad input, bad label, wrong modality, too few labels."""


class NotFound(HeadserveError):
    """An unknown task, backbone, job or version."""


class AlreadyExists(HeadserveError):
    """A task with this id exists."""


class FailedPrecondition(HeadserveError):
    """The request is valid but the system is not in a state to serve it (task not ready, backbone unavailable)."""


class ResourceExhausted(HeadserveError):
    """A configured limit was hit."""


class Unavailable(HeadserveError):
    """A backbone or device failed; retrying elsewhere may help."""


class DeadlineExceeded(HeadserveError):
    """The caller's deadline passed before the work was done (e.g. while a prediction was queued)."""


class Cancelled(HeadserveError):
    """The caller cancelled the request before it was served."""


class Unauthenticated(HeadserveError):
    """No credentials, or credentials that are malformed, unknown, revoked or expired."""


class PermissionDenied(HeadserveError):
    """Valid credentials without the scope the call needs."""
