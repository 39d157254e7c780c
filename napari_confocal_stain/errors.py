"""Exceptions raised for bad input.

Every error about a file names the file and says what is wrong with it, so the
napari shell can show it as one notification and the CLI as one line.
"""

from __future__ import annotations

from pathlib import Path


class ConfocalStainError(Exception):
    """Base class of every error this package raises on purpose."""


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

    def __reduce__(self) -> tuple[type, tuple[Path | None, str]]:
        # Rebuilt from (path, problem): a dask worker process raises it to the caller.
        return type(self), (self.path, self.problem)


class CheckpointError(ConfocalStainError, ValueError):
    """A model checkpoint is missing, tampered with, or does not match its architecture."""
