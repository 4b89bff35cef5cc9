"""Errors that the CLI turns into one line and a non-zero exit, never a traceback."""

from __future__ import annotations


class SftuneError(Exception):
    """A user-facing error: bad input, a missing file, an impossible setting."""


class DataError(SftuneError):
    """Bad training data. The message names the file, the line (where there is one) and the problem."""

    def __init__(self, path, problem: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = problem if field is None else f"field {field!r}: {problem}"
        super().__init__(f"{where}: {what}")


class ConfigError(SftuneError):
    """A flag or config-file value that cannot work (names the setting)."""
