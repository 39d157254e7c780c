"""Exceptions raised for bad input.

Every error about a file names the file and says what is wrong with it, so the
napari shell can show it as one notification and the CLI as one line. :func:`explain` is
the one place any exception (including the OS's and running out of memory) becomes that
line and the command line's exit status.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class ConfocalStainError(Exception):
    """Base class of every error this package raises on purpose.

    ``exit_status`` is what the command line exits with after it (2: the user's input or
    options; subclasses for an interruption use 130).
    """

    exit_status: int = 2


class MosaicError(ConfocalStainError, ValueError):
    """A slide could not be opened or is not a valid R/F confocal mosaic.

    Parameters
    ----------
    path
        The file or folder at fault (``None`` if the problem is not tied to one).
    problem
        What is wrong, in words a user understands.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")

    def __reduce__(self) -> tuple:
        # Rebuilt from (path, problem), not from the message: a dask worker's error then
        # reaches the client as itself.
        return type(self), (self.path, self.problem)


class CheckpointError(ConfocalStainError, ValueError):
    """A model checkpoint is missing, tampered with, or does not match its architecture."""


class OutputError(ConfocalStainError):
    """An output could not be written where the user asked (bad place, full disk, …).

    Parameters
    ----------
    path
        The output (or its work folder) at fault.
    problem
        What is wrong, in words a user understands.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")

    def __reduce__(self) -> tuple:
        # Rebuilt from (path, problem), not from the message: a dask worker's error then
        # reaches the client as itself.
        return type(self), (self.path, self.problem)


class UsageError(ConfocalStainError, ValueError):
    """An option's value is out of range in a way only known once the slide is open."""


# ----------------------------------------------------------------------------------------------
# The one mapping from an exception to what the user is told.

USER_ERROR = 2
"""Exit status of a failure the user caused (bad file, bad option, full disk, …)."""
INTERNAL_ERROR = 1
"""Exit status of a bug: the one-line summary says so."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""

_ERRNO_WORDS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "disk full (no space left on the device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (limit of the file system or of this process)",
    errno.ELOOP: "symbolic link loop (a link in the path points back to itself)",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "already exists",
    errno.ENOENT: "does not exist",
    errno.ENOTEMPTY: "folder is not empty",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error (failing disk or lost network share)",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files on the system",
    errno.ENOMEM: "out of memory",
    errno.EBUSY: "busy (in use by another program)",
    errno.ETXTBSY: "busy (in use by another program)",
    errno.EXDEV: "cannot move across file systems",
    errno.ENXIO: "no such device",
    errno.ENODEV: "no such device",
    errno.EINVAL: "invalid argument (the file system does not support this)",
}

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""errnos after which freeing space lets an interrupted export resume."""


def one_line(text: str, limit: int = 500) -> str:
    """``text`` as one line (library messages can span several), at most ``limit`` chars."""
    lines = [s.strip() for s in str(text).splitlines() if s.strip()]
    out = "; ".join(lines)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _is_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # torch reports a failed CPU/GPU allocation as RuntimeError (OutOfMemoryError on CUDA).
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def _symlink_loop(exc: BaseException) -> OSError | None:
    """``Path.resolve`` (Python < 3.13) reports a symlink loop as RuntimeError."""
    text = str(exc)
    if type(exc) is RuntimeError and text.startswith("Symlink loop from "):
        return OSError(
            errno.ELOOP, os.strerror(errno.ELOOP), text[len("Symlink loop from ") :].strip("'")
        )
    return None


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, as a traceback shows them."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def user_fault(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that a user caused and can act on, or None.

    That is a :class:`ConfocalStainError`, an ``OSError`` (the OS refused a read or a
    write), or running out of memory. Libraries (dask, zarr, tifffile) sometimes wrap such
    an error in one of their own while computing; the chain still holds it.
    """
    for e in _chain(exc):
        if isinstance(e, ConfocalStainError | OSError) or _is_memory(e):
            return e
        loop = _symlink_loop(e)
        if loop is not None:
            return loop
    return None


def disk_full(exc: BaseException) -> OSError | None:
    """The ``OSError`` in ``exc``'s chain saying the disk (or quota) is full, or None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
    return None


def _blocking_file(path: str) -> str | None:
    """The first ancestor of ``path`` that exists and is not a folder (ENOTDIR's culprit)."""
    p = Path(path)
    for q in [*reversed(p.parents), p]:
        try:
            if q.exists() and not q.is_dir():
                return str(q)
        except OSError:
            return None
    return None


def describe_os_error(exc: OSError, subject: str | Path | None = None) -> str:
    """``"<file>: <problem in words>"`` for an error the OS raised.

    Parameters
    ----------
    exc
        The error (its ``filename`` names the file when the OS call had one).
    subject
        The file to name when the error carries none (a failed ``write()`` on an open file).
    """
    words = _ERRNO_WORDS.get(exc.errno) if exc.errno is not None else None
    if words is None:
        words = exc.strerror or one_line(str(exc)) or type(exc).__name__
        words = words[:1].lower() + words[1:]
    path = exc.filename if exc.filename is not None else subject
    if exc.errno == errno.ENOTDIR and path is not None:
        culprit = _blocking_file(os.fsdecode(path))
        if culprit == os.fsdecode(path):
            words = "is a file, not a folder"
        elif culprit is not None:
            words = f"{culprit} is a file, not a folder"
    if path is None:
        return words
    where = os.fsdecode(path)
    if exc.filename2 is not None:
        where = f"{where} → {os.fsdecode(exc.filename2)}"
    return f"{where}: {words}"


def explain(exc: BaseException, subject: str | Path | None = None) -> tuple[str, int]:
    """What to tell the user about ``exc``, in one line, and the CLI's exit status.

    The one place every shell (command line, napari widgets, writer) turns an error into
    words: a user-caused error (:func:`user_fault`) names the file and the problem and
    has status :data:`USER_ERROR` (2); Ctrl-C has :data:`INTERRUPTED` (130); anything else
    is a bug, summarised as ``"internal error: <type>: <message>"`` with
    :data:`INTERNAL_ERROR` (1) (the shells offer the traceback separately).

    Parameters
    ----------
    exc
        The error.
    subject
        The file the failed operation was about, named when the error itself names none
        (running out of memory, a failed write on an open file).

    Returns
    -------
    tuple of (str, int)
        The message (one line, no trailing period) and the exit status.
    """
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", INTERRUPTED
    found = user_fault(exc)
    if found is None:
        return f"internal error: {type(exc).__name__}: {one_line(str(exc))}", INTERNAL_ERROR
    if isinstance(found, ConfocalStainError):
        return one_line(str(found)), int(getattr(found, "exit_status", USER_ERROR))
    if isinstance(found, OSError):
        return one_line(describe_os_error(found, subject)), USER_ERROR
    detail = one_line(str(found))
    where = f"{subject}: " if subject is not None else ""
    if "memory" in detail.lower():
        return f"{where}{detail}", USER_ERROR
    return f"{where}out of memory" + (f" ({detail})" if detail else ""), USER_ERROR
