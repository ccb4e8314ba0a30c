"""The indexer's exceptions, and the one place they turn into exit codes, HTTP statuses and error bodies.

    IndexerError                    base; every error the CLI and the HTTP surfaces know how to report
    ├── ConfigError                 a setting or a request field is invalid (names it)        → exit 2, HTTP 400
    ├── ModelError                  the model cannot be built or run                          → HTTP 503
    │   └── WeightsNotFoundError    no weights offline; names the files and where to put them
    ├── StoreError                  the vector store failed                                   → HTTP 503
    │   ├── StoreBusyError          the embedded store is open in another process             → HTTP 503
    │   ├── StoreFullError          the embedded store's disk is below store.min_free_mb      → HTTP 503
    │   ├── StoreOwnedError         another process owns the store and serves it (names where) → HTTP 503
    │   └── ModelMismatchError      the collection was made by another model                  → HTTP 409
    ├── DecodeError                 one file cannot be turned into pixels (carried per file)  → HTTP 422
    ├── UnknownImageError           a query names image ids the store does not hold          → HTTP 404
    ├── UnknownJobError             no review or index job with this id (never started, or dropped) → HTTP 404
    ├── NotServableError            an indexed file the service will not send                 → HTTP 404
    ├── PayloadTooLargeError        a request body or an upload above its limit               → HTTP 413
    ├── ServiceBusyError            every upload-decode slot is taken (serve.max_decodes)     → HTTP 503 + Retry-After
    └── AccessError                 an HTTP request refused before it is read
        ├── HostNotAllowedError     a Host header that is not loopback, without an API key    → HTTP 403
        ├── UnauthorizedError       a missing or wrong API key                                → HTTP 401
        └── UnsupportedMediaError   a body not declared as the type its route takes (JSON)    → HTTP 415

    InotifyLimitError               an OSError, not an IndexerError: a root needs more inotify watches than the
                                    system grants; the watcher catches it and falls back to polling

Private control flow stays where it is raised and caught: ``decode._Unusable`` (a file's reason, turned into a
Failure) and ``cli.serve._Terminated`` (SIGTERM, turned into a clean exit).

Exit codes (the one home of them: `EXIT_OK`, `EXIT_FAILURES`, `EXIT_ERROR`, `EXIT_INTERRUPTED`; `exit_code_for`,
used by `indexer.cli`): every IndexerError that stops a command exits 2; a run that finished with some failed files
exits 1 (decided by the command, not here); Ctrl-C exits 130.

HTTP (`http_status_for`, `error_body`, `error_from_body`): every HTTP surface (`indexer serve` and the watch
daemon's control endpoint) answers an error with the body ``{"detail": message, "error": Kind, ...fields}``, where
Kind is the exception's class name and the fields are its data (``setting`` and ``reason`` of a ConfigError, ...);
the daemon's client rebuilds the same exception from that body.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar


class IndexerError(Exception):
    """Base class of every error the indexer raises on purpose; ``FIELDS`` name the data an error body carries."""

    FIELDS: ClassVar[tuple[str, ...]] = ()


class ConfigError(IndexerError):
    """An invalid setting; `setting` names it (dotted, as in the config file)."""

    FIELDS = ("setting", "reason")

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"invalid setting {setting}: {reason}")
        self.setting = setting
        self.reason = reason


class ModelError(IndexerError):
    """The model cannot be built, loaded or run."""


class WeightsNotFoundError(ModelError):
    """No weights could be found locally and none could be downloaded."""

    def __init__(self, model: str, expected: list[str], places: list[str], cause: str = "") -> None:
        lines = [f"no weights found for model {model}."]
        lines.append("Expected one of: " + ", ".join(expected))
        lines.append("Looked in: " + "; ".join(places))
        lines.append(
            "Put the file in the model directory (--model-dir / INDEXER_MODEL__DIR), pass --weights FILE, "
            "or run once with network access to fill the Hugging Face cache (HF_HOME)."
        )
        if cause:
            lines.append(f"Download failed: {cause}")
        super().__init__("\n".join(lines))
        self.model = model
        self.expected = expected
        self.places = places


class StoreError(IndexerError):
    """The vector store failed."""


class StoreBusyError(StoreError):
    """The embedded store directory is held by another process."""

    def __init__(self, path: Path, detail: str = "") -> None:
        msg = f"the store at {path} is in use by another process"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.path = path


class StoreOwnedError(StoreError):
    """The embedded store is owned by another process (`indexer watch`, `indexer serve`) that serves it; the
    message says where."""


class StoreFullError(StoreError):
    """The embedded store's filesystem has less free space than store.min_free_mb: nothing was written."""


class ModelMismatchError(StoreError):
    """The collection records a different model than the one asked for."""

    FIELDS = ("store_model", "model")

    def __init__(self, store_model: str, model: str, where: str) -> None:
        super().__init__(
            f"the store {where} was built with model {store_model!r}, not {model!r}: "
            "use the same model, or a new store (--store DIR / --collection NAME)"
        )
        self.store_model = store_model
        self.model = model


class DecodeError(IndexerError):
    """One file could not be decoded; `reason` is the short human explanation."""

    FIELDS = ("reason",)

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnknownImageError(IndexerError):
    """A query names indexed images (by id) that the store does not hold; `ids` lists them."""

    FIELDS = ("ids",)

    def __init__(self, ids: Sequence[str]) -> None:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        super().__init__(f"no indexed image with id {shown}")
        self.ids = list(ids)


class UnknownJobError(IndexerError):
    """No job with this id (never started, or dropped from memory)."""

    FIELDS = ("job_id",)

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}: it was never started or is no longer kept (start a new one)")
        self.job_id = job_id


class NotServableError(IndexerError):
    """An indexed file that the service will not send: outside the served roots, gone, or not an image file."""

    FIELDS = ("image_id", "reason")

    def __init__(self, image_id: str, reason: str) -> None:
        super().__init__(f"image {image_id} cannot be served: {reason}")
        self.image_id = image_id
        self.reason = reason


class PayloadTooLargeError(IndexerError):
    """A request body or an uploaded image above its limit (serve.max_upload_mb)."""


class ServiceBusyError(IndexerError):
    """Every slot for decoding uploads is taken (serve.max_decodes); retry after ``retry_after`` seconds."""

    FIELDS = ("retry_after",)

    def __init__(self, what: str, retry_after: int = 1) -> None:
        super().__init__(f"the service is busy: {what}; retry after {retry_after} s")
        self.retry_after = retry_after


class InotifyLimitError(OSError):
    """A root needs more inotify watches than the system grants."""


class AccessError(IndexerError):
    """An HTTP request refused before its body is read."""


class HostNotAllowedError(AccessError):
    """A Host header that is not a loopback name while no API key is set (a DNS-rebinding guard)."""


class UnauthorizedError(AccessError):
    """A request without the right ``Authorization: Bearer KEY``."""


class UnsupportedMediaError(AccessError):
    """A request body not declared as the type its route takes: JSON, or a page of points (a cross-origin form or
    text/plain post)."""


# --- one mapping to exit codes, one to HTTP statuses, one error body ------------------------------------------------

EXIT_OK, EXIT_FAILURES, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# Most specific first: the first matching class gives the status.
HTTP_STATUS_FOR: tuple[tuple[type[IndexerError], int], ...] = (
    (UnknownImageError, 404),
    (UnknownJobError, 404),
    (NotServableError, 404),
    (PayloadTooLargeError, 413),
    (ServiceBusyError, 503),
    (HostNotAllowedError, 403),
    (UnauthorizedError, 401),
    (UnsupportedMediaError, 415),
    (DecodeError, 422),
    (ModelMismatchError, 409),
    (StoreBusyError, 503),
    (ConfigError, 400),
    (StoreError, 503),
    (ModelError, 503),
)


def exit_code_for(exc: IndexerError) -> int:
    """The exit code of a command stopped by ``exc``."""
    return EXIT_ERROR


def http_status_for(exc: IndexerError) -> int:
    """The HTTP status of an IndexerError (400 for one not listed)."""
    return next((status for cls, status in HTTP_STATUS_FOR if isinstance(exc, cls)), 400)


def error_body(kind: str, detail: str, **fields: Any) -> dict[str, Any]:
    """The JSON body of every HTTP error: ``{"detail": message, "error": Kind, ...fields}``."""
    return {"detail": detail, "error": kind, **fields}


# What every HTTP surface answers for an unexpected exception (its traceback goes to the log, not to the client).
INTERNAL_ERROR = error_body("InternalError", "internal error (logged)")


def body_for(exc: IndexerError) -> dict[str, Any]:
    """The error body of an IndexerError: its message, class name and data fields."""
    fields = {name: _plain(getattr(exc, name)) for name in exc.FIELDS if hasattr(exc, name)}
    return error_body(type(exc).__name__, str(exc), **fields)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _kinds(cls: type[IndexerError]) -> dict[str, type[IndexerError]]:
    found = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_kinds(sub))
    return found


def error_from_body(body: Any, fallback: str) -> IndexerError:
    """The exception an error body describes (the same class and data); a StoreError saying ``fallback`` for a body
    that is not one (or names a kind this version does not know: the message is kept)."""
    if not isinstance(body, dict) or not isinstance(body.get("detail"), str):
        return StoreError(fallback)
    cls = _kinds(IndexerError).get(str(body.get("error")), StoreError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, body["detail"])
    for name in cls.FIELDS:
        if name in body:
            setattr(exc, name, body[name])
    return exc
