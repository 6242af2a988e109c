"""Errors the server raises on purpose, each with the HTTP status it maps to.

The API layer formats them per dialect (Ollama `{"error": ...}`, OpenAI's error object); everything
below the API raises these and never builds HTTP responses itself.
"""

from __future__ import annotations


class ServerError(Exception):
    status_code: int = 500
    error_type: str = "server_error"  # OpenAI's `type`

    def __init__(self, message: str, *, retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param


class InvalidRequest(ServerError):
    status_code = 400
    error_type = "invalid_request_error"


class InvalidModelName(InvalidRequest):
    pass


class ModelNotFound(ServerError):
    status_code = 404
    error_type = "not_found_error"


class NotFound(ServerError):
    """Something other than a model (e.g. a pull job) does not exist."""

    status_code = 404
    error_type = "not_found_error"


class ModelNotAllowed(ServerError):
    """The model needs something the operator has not allowed (e.g. trust_remote_code)."""

    status_code = 403
    error_type = "permission_error"


class ModelLoadFailed(ServerError):
    status_code = 500


class ModelCoolingDown(ServerError):
    """A recent load failed; the model is not retried until the cooldown passes."""

    status_code = 503


class ServerBusy(ServerError):
    status_code = 503


class Unauthorized(ServerError):
    status_code = 401
    error_type = "authentication_error"
