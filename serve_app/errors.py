"""The service's typed errors: raised where a problem is found, turned into HTTP in the ingress."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from serve_app.scoring.types import PairTooLong, ScoringError, TooManyWindows


class RerankError(Exception):
    """Base: `status` is the HTTP status the ingress answers with; `field` names the input at fault."""

    status = 500
    kind = "internal_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def headers(self) -> dict[str, str]:
        return {}

    def __reduce__(self):
        # Keeps the field when the error crosses a Ray process boundary.
        return (type(self), (self.message, self.field))


class InvalidInput(RerankError):
    status = 422
    kind = "invalid_input"


class InputTooLarge(RerankError):
    status = 413
    kind = "input_too_large"


class ModelNotFound(RerankError):
    """A request's `model` names no served model: the answer lists the names that are served."""

    status = 404
    kind = "model_not_found"

    def __init__(self, message: str, models: list[str] | None = None) -> None:
        super().__init__(message, "model")
        self.models = models or []

    def __reduce__(self):
        return (type(self), (self.message, self.models))


class Unauthorized(RerankError):
    status = 401
    kind = "unauthorized"


class PoolUnavailable(RerankError):
    """A pool whose model did not load, or that is switched off."""

    status = 503
    kind = "pool_unavailable"


class Overloaded(RerankError):
    """Every replica's queue is full: retry after `retry_after_s` seconds."""

    status = 503
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s))


class ReplicaLost(Overloaded):
    """A replica died (killed, out of memory, a failed GPU) with this request's pairs, or none is running: retry
    once Serve has started its replacement."""

    kind = "replica_lost"


class ModelUnavailable(Overloaded):
    """A shared model that will not be loaded right now: loading it would evict a model that served within
    keep_resident_s, or its last load failed within load_backoff_s. 503 + Retry-After."""

    kind = "model_unavailable"


class DeadlyInput(RerankError):
    """Pairs that were being scored when replicas died, more than once: refused at once for a while (setting
    deadly_input_ttl_s), so that one input cannot take down a pool replica after replica."""

    status = 422
    kind = "deadly_input"


class StaleTokenizer(Overloaded):
    """A pool refused token ids made with another tokenizer than its own (the model behind `model` changed since
    the ingress fetched its tokenizer): the ingress fetches the pool's again and resends once; twice, retry."""

    kind = "stale_tokenizer"

    def __init__(self, message: str, retry_after_s: int = 1, model: str = "") -> None:
        super().__init__(message, retry_after_s)
        self.model = model

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s, self.model))


class ModelFault(RerankError):
    """The model failed in a way no input explains and more capacity would not fix (scores that are not
    numbers): a 500 that says what went wrong, never a ranking of NaNs."""

    status = 500
    kind = "model_fault"


class DeadlineExceeded(RerankError):
    status = 504
    kind = "deadline_exceeded"


def scoring_error(exc: ScoringError, field: str = "documents") -> RerankError:
    """A scoring error as the request's own: a pair too long (or too many windows) is a 413, any other pair the
    model cannot take a 422."""
    if isinstance(exc, (PairTooLong, TooManyWindows)):
        return InputTooLarge(str(exc), field)
    return InvalidInput(str(exc), field)


@contextmanager
def as_request_errors(field: str = "documents") -> Iterator[None]:
    """A scoring error as the request's own error, wherever pairs are checked (the ingress tokenizing, a replica
    checking a call): a pair too long for the model is a 413, any other pair the model cannot take a 422."""
    try:
        yield
    except ScoringError as exc:
        raise scoring_error(exc, field) from None
