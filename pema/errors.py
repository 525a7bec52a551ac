"""Named errors raised at the project's boundaries.

Every error is a ValueError or TypeError subclass so callers that only know the builtin types still
catch them; the message always names the offending value and, where there is one, the fix.
"""
import errno


class PemaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PemaError, ValueError):
    """A configuration key or value is unknown or out of range."""


class DataError(PemaError, ValueError):
    """Task data (JSONL pairs, parallel text) is malformed: bad JSON, a missing field, an empty text."""


class MemoryFormatError(PemaError, ValueError):
    """An external memory on disk is incomplete, corrupt or inconsistent with its manifest."""


class MemoryMismatchError(PemaError, ValueError):
    """A memory and a head bundle (or adapter) disagree on d, vocabulary size or model id."""


class UnsupportedArchitectureError(PemaError, ValueError):
    """The PLM's architecture has no known final norm / output head layout."""


class ScheduleError(PemaError, ValueError):
    """An interpolation weight lambda or a schedule parameter is outside its allowed range."""


class CheckpointError(PemaError):
    """A training checkpoint folder is missing, damaged or of another format."""


class TrackingError(PemaError):
    """The MLflow tracking store or server is unreachable or refused a run."""


class OwnerUnavailableError(PemaError, ConnectionError):
    """The PLM owner's service does not answer (the message names its URL)."""


class OwnerRequestError(PemaError):
    """The PLM owner's service refused a request: ``status`` is its HTTP status (401, 404, 413, ...)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def named_open_errors(path, error: type[PemaError], what: str):
    """A context manager for opening ``path``: FileNotFoundError passes; a folder, or a file that cannot be read
    (a parent that is a file, no permission, ...), becomes ``error`` naming the path."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except FileNotFoundError:
            raise
        except IsADirectoryError:
            raise error(f"{path} is a folder, not {what}") from None
        except OSError as exc:
            raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return guard()


FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, the file size limit (RLIMIT_FSIZE), a quota
SQLITE_FULL = 13  # sqlite's "database or disk is full"


def full_disk(exc: BaseException | None) -> OSError | None:
    """The write that failed for want of space (a full disk, a quota, the file size limit) behind ``exc``, or None
    when ``exc`` is something else. Looks through what wraps it: chained exceptions, a Ray task's error (``cause``),
    Ray Train's ``ControllerError`` and ``WorkerGroupError`` (each worker's error, unwrapped), SQLAlchemy's driver
    error (``orig``); sqlite's "database or disk is full" comes back as an ENOSPC OSError without a file name."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            return e
        if getattr(e, "sqlite_errorcode", None) == SQLITE_FULL or (
                type(e).__module__ == "sqlite3" and "database or disk is full" in str(e)):
            return OSError(errno.ENOSPC, "No space left on device (database or disk is full)")
        failures = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, *(getattr(e, name, None) for name in
                                               ("cause", "orig", "controller_failure", "_base_exc")),
                 *(failures.values() if isinstance(failures, dict) else ())]
    return None
