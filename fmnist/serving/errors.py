"""Why the server refuses a request, as TF Serving says it: a canonical status code (gRPC's), the HTTP
status TF Serving's REST server maps it to, and the reason it is counted under in the metrics.

Plain exceptions with one message argument, so that they cross from the worker processes that
parse bodies (pickled) unchanged.
"""

from __future__ import annotations

# TF Serving's http_server.cc maps each canonical code to one HTTP status.
HTTP_STATUS = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request the server cannot answer; the message says what is wrong with it."""

    code = "INVALID_ARGUMENT"
    reason = "bad_request"  # the metrics' refusal reason
    http_status: int | None = None  # where HTTP has a more exact status than TF Serving's mapping

    @property
    def status(self) -> int:
        return self.http_status or HTTP_STATUS[self.code]


class BadRequest(ServingError):
    """The body or path is not a request this server answers (400)."""


class TooLarge(ServingError):
    """A body over its limit (HTTP 413, before it is read whole)."""

    code, reason, http_status = "RESOURCE_EXHAUSTED", "too_large", 413


class TooSlow(ServingError):
    """A client that did not send its body within the deadline (HTTP 408; the connection is closed)."""

    code, reason, http_status = "DEADLINE_EXCEEDED", "too_slow", 408


class Busy(ServingError):
    """The bytes of bodies in flight would pass the server's budget: try again shortly (429)."""

    code, reason = "RESOURCE_EXHAUSTED", "busy"


class NotFound(ServingError):
    """No such model, version or endpoint (404)."""

    code, reason = "NOT_FOUND", "not_found"


class ModelFailed(ServingError):
    """The model call raised (500): the version's own failure, counted against it in the evidence."""

    code, reason = "INTERNAL", "model_failed"  # fmnist.evaluation.evidence.MODEL_FAILED (this module stays light)


class NotReady(ServingError):
    """No verified model is loaded for the request yet (503)."""

    code, reason = "UNAVAILABLE", "not_ready"
