"""Operating-system failures on input paths, turned into one :class:`MosaicError` each.

A path the user gives can be missing, a broken or looping symbolic link, unreadable, or a
folder where a file belongs (and back). These helpers look before the readers do, and say
which of those it is, naming the path; every ``OSError`` from listing or reading an input
goes through :func:`os_problem` so it reads the same everywhere.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from napari_confocal_stain.errors import MosaicError

__all__ = [
    "check_file",
    "check_folder",
    "is_dir",
    "is_file",
    "list_folder",
    "os_problem",
    "read_head",
]

_WORDS = {
    errno.EACCES: "cannot be read: permission denied",
    errno.EPERM: "cannot be read: operation not permitted",
    errno.ELOOP: "is a symbolic link loop, or lies under one",
    errno.ENOENT: "does not exist",
    errno.ENOTDIR: "does not exist (a part of its path is a file, not a folder)",
    errno.ENAMETOOLONG: "has a name too long for the file system",
    errno.EIO: "cannot be read: input/output error (a failing disk or network share?)",
    errno.EISDIR: "is a folder, not a file",
}


def os_problem(exc: OSError) -> str:
    """Words for an ``OSError`` met while looking at or reading an input path.

    Parameters
    ----------
    exc
        The error.

    Returns
    -------
    str
        E.g. ``"cannot be read: permission denied"``, without the path.
    """
    words = _WORDS.get(exc.errno or -1)
    if words is not None:
        return words
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _missing(p: Path) -> str:
    """Why a path that ``stat`` cannot find is not there: missing, or a broken link."""
    try:
        target = os.readlink(p)
    except OSError:
        return "does not exist"
    return f"is a broken symbolic link (to {target}, which does not exist)"


def _access(p: Path, mode: int) -> bool:
    # The effective ids are the ones open() is checked against.
    if os.access in os.supports_effective_ids:
        return os.access(p, mode, effective_ids=True)
    return os.access(p, mode)


def _stat(p: Path) -> os.stat_result:
    try:
        return p.stat()
    except FileNotFoundError as exc:
        raise MosaicError(p, _missing(p)) from exc
    except OSError as exc:
        raise MosaicError(p, os_problem(exc)) from exc


def check_file(path: str | os.PathLike[str], what: str = "") -> int:
    """Raise unless ``path`` is a readable regular file; return its size in bytes.

    Parameters
    ----------
    path
        The file.
    what
        Words appended in parentheses, e.g. ``"the F image"``.

    Returns
    -------
    int

    Raises
    ------
    MosaicError
        Missing, a broken or looping link, a folder, a device, or unreadable.
    """
    p = Path(path)
    suffix = f" ({what})" if what else ""
    try:
        st = _stat(p)
    except MosaicError as exc:
        raise MosaicError(p, exc.problem + suffix) from exc.__cause__
    if stat.S_ISDIR(st.st_mode):
        raise MosaicError(p, f"is a folder, not a file{suffix}")
    if not stat.S_ISREG(st.st_mode):
        raise MosaicError(p, f"is not a regular file (a device, pipe or socket){suffix}")
    if not _access(p, os.R_OK):
        raise MosaicError(p, f"cannot be read: permission denied{suffix}")
    return int(st.st_size)


def check_folder(path: str | os.PathLike[str]) -> None:
    """Raise unless ``path`` is a folder this process may list.

    Raises
    ------
    MosaicError
    """
    p = Path(path)
    st = _stat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise MosaicError(p, "is a file, not a folder")
    if not _access(p, os.R_OK | os.X_OK):
        raise MosaicError(p, "cannot be listed: permission denied")


def list_folder(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """The entries of a folder, sorted by name.

    Raises
    ------
    MosaicError
        If the folder cannot be listed (missing, permission denied, ...).
    """
    p = Path(path)
    try:
        with os.scandir(p) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError as exc:
        raise MosaicError(p, _missing(p)) from exc
    except NotADirectoryError as exc:
        raise MosaicError(p, "is a file, not a folder") from exc
    except PermissionError as exc:
        raise MosaicError(p, "cannot be listed: permission denied") from exc
    except OSError as exc:
        raise MosaicError(p, os_problem(exc)) from exc


def is_dir(entry: os.DirEntry[str] | str | os.PathLike[str]) -> bool:
    """``is_dir`` that is ``False`` (not an exception) for looping or unreadable links."""
    try:
        if isinstance(entry, os.DirEntry):
            return entry.is_dir()
        return stat.S_ISDIR(os.stat(entry).st_mode)
    except OSError:
        return False


def is_file(entry: os.DirEntry[str] | str | os.PathLike[str]) -> bool:
    """``is_file`` that is ``False`` (not an exception) for looping or unreadable links."""
    try:
        if isinstance(entry, os.DirEntry):
            return entry.is_file()
        return stat.S_ISREG(os.stat(entry).st_mode)
    except OSError:
        return False


def read_head(path: str | os.PathLike[str], n: int = 8) -> bytes:
    """The first ``n`` bytes of a file.

    Raises
    ------
    MosaicError
        If the file cannot be opened or read.
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise MosaicError(path, os_problem(exc)) from exc
