"""Error classes shared by the backend, the wire protocol and its clients.

Every error has a stable string ``code`` (what travels on the wire) and, where the
fault lies in one input, the ``field`` it names. Messages say what was wrong and how
to fix it, with the actual values.
"""

from __future__ import annotations


class Psd3dError(Exception):
    """Base class: every error psd3d raises on purpose derives from it."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        return {"code": self.code, "field": self.field, "message": self.message}


class InvalidInputError(Psd3dError):
    """A request field has a bad value (empty, too long, out of range, NaN...)."""

    code = "invalid_input"


class UnknownNameError(InvalidInputError):
    """A name (method, preset, reward...) is not one of the offered choices."""

    code = "unknown_name"


class ModelNotFoundError(Psd3dError):
    """Model weights are missing locally and cannot be fetched."""

    code = "model_not_found"


class NumericalError(Psd3dError):
    """The optimisation produced NaN or inf."""

    code = "numerical"


class CancelledError(Psd3dError):
    """A job was cancelled by its owner."""

    code = "cancelled"


class UnsupportedEnvironmentError(Psd3dError):
    """The machine cannot run psd3d safely as it is (e.g. a libzmq with a known vulnerability)."""

    code = "unsupported_environment"


class UnauthorizedError(Psd3dError):
    """A request from a CURVE key that is no longer on the server's allow-list (revoked)."""

    code = "unauthorized"


class DataFolderInUseError(Psd3dError):
    """Another ``psd3d serve`` (or ``psd3d jobs recover``) holds the data folder's lock: one owner at a time."""

    code = "data_in_use"


class StoreDamagedError(Psd3dError):
    """The job store file is emptied, unreadable or missing while job folders exist; the message names
    ``psd3d jobs recover``, which rebuilds it from the job folders."""

    code = "store_damaged"


class DiskFullError(Psd3dError):
    """The data folder's disk is (nearly) full: submits are refused, a job that hit it fails with this code."""

    code = "disk_full"


class StorageError(Psd3dError):
    """The job store or a job folder could not be written (an I/O or SQLite error other than a full disk)."""

    code = "storage_error"


class QueueFullError(Psd3dError):
    """A submit that would take the queued jobs past the server's limit for its client or in total
    (``hello.limits.queued_per_client`` / ``queued_total``); nothing was created."""

    code = "queue_full"


def require(condition: bool, field: str, reason: str) -> None:
    """Raise :class:`InvalidInputError` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise InvalidInputError(f"{field}: {reason}", field=field)


def require_choice(value: str, choices: list[str] | tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise UnknownNameError(
            f"{field}: unknown value {value!r}; choose one of {', '.join(choices)}", field=field
        )
