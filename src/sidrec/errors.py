"""User-facing errors.

Anything the user can fix (a bad file, a bad option, data that filtering empties) raises
`UserError`; the CLI prints its message and exits with status 2, without a traceback.
"""

from __future__ import annotations


class SidrecWarning(UserWarning):
    """A warning sidrec itself raises (the CLI shows these, one line each, and silences libraries')."""


class NonBijectiveWarning(SidrecWarning):
    """A run's codebook gives two items the same ID: Q is then not a distribution over items."""


class UserError(Exception):
    """An error caused by user input; the message must say what to fix."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line
