"""The failures ganforge expects, each with its exit code: the CLI prints one line and exits with it, the
Prefect flow does not retry the ones that would only recur.

| exit | error |
| ---- | ----- |
| 1 | anything else that went wrong while running (a stage that failed after its retries, ...) |
| 2 | invalid parameters (``ParamsError``) |
| 3 | the champion gate refused a promotion (``PromotionRefused``) |
| 4 | a missing or damaged input: shards, manifest, checkpoint, evaluation file (``InputError``) |
| 5 | an unknown registered model, version or alias (``RegistryError``) |
| 6 | permission denied on a file or folder, or a read-only file system |
| 7 | a configured service cannot be reached: Prefect API, MLflow tracking server, Ray cluster, S3 endpoint (``ServiceError``) |
| 8 | the output folder is held by another running process (``BusyError``) |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations


class GanforgeError(Exception):
    exit_code = 1
    retryable = True  # False: trying again gives the same failure (fix the input first)


class InputError(GanforgeError, ValueError):
    """A missing or damaged input; the message names the file and what to do."""

    exit_code = 4
    retryable = False


class CheckpointError(InputError):
    """A checkpoint is incomplete (a torn write) or unreadable."""


class ShardError(InputError):
    """Shards disagree with their manifest (missing, truncated, wrong size, count or sha256)."""


class RegistryError(GanforgeError, LookupError):
    """No such registered model, version or alias."""

    exit_code = 5
    retryable = False


def is_retryable(exc: BaseException) -> bool:
    """Whether running the same thing again can succeed (a crash, a lost worker) or not (bad input)."""
    if isinstance(exc, GanforgeError):
        return exc.retryable
    return not isinstance(exc, (ValueError, PermissionError, FileNotFoundError, KeyError, LookupError))


class StageError(GanforgeError, RuntimeError):
    """A training stage failed (after its restarts); carries the root cause's exit code and retryability."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        if cause is not None:
            self.exit_code = getattr(cause, "exit_code", 4 if isinstance(cause, (ValueError, KeyError)) else 1)
            self.retryable = is_retryable(cause)


def root_cause(exc: BaseException) -> BaseException:
    """The exception that started it: through Ray Train's WorkerGroupError (the lowest failing rank) or
    ControllerError, Ray's task-error wrappers (``.cause``) and ``raise ... from``."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "controller_failure", None) or getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def one_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:400] if lines else ''}".rstrip(": ")


class ServiceError(GanforgeError, ConnectionError):
    """A configured service (Prefect API, MLflow tracking server, Ray cluster, S3 endpoint) cannot be reached;
    the message names it and what to do."""

    exit_code = 7



class BusyError(GanforgeError):
    """Another process holds the folder this one would write (a run folder, a shard folder being written); the
    message names the holder."""

    exit_code = 8
    retryable = False
