"""How outputs reach the disk: atomic file writes and the name of an export's work folder.

:func:`write_atomic` writes a temporary file beside the target, fsyncs it, then renames it:
an interrupted or failed write leaves either the old file or the new one, never a partial
file (the project's rule for every output it writes); an ``OSError`` it raises names the
destination. :func:`work_folder` is the one rule for where a long output is built before it
is renamed into place.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["work_folder", "write_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path
        Destination file; its folder is created if missing.
    data
        Bytes, or text (encoded as UTF-8).
    mode
        Permission bits of the result (``mkstemp`` would leave 0600, which makes
        shared outputs such as checkpoints unreadable to other users).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word for "the parent is a file": say that
        raise NotADirectoryError(
            errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)
        ) from None
    blob = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            # A failed write() on an open file names no file (a full disk, say): name ours.
            exc.filename = str(path)
        raise
    return path


def work_folder(out: str | os.PathLike) -> Path:
    """Where the output ``out`` is built before it is renamed into place: ``.OUT.partial``.

    A hidden sibling of ``out`` (so it is on the same file system and the final rename is
    atomic), never inside a slide's folder. Exports resume from it (``--resume``).

    Parameters
    ----------
    out
        The output path.

    Returns
    -------
    pathlib.Path
    """
    out = Path(out)
    return out.parent / f".{out.name}.partial"
