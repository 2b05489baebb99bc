"""The one exception type for bad input: the command line prints its message
alone (no traceback) and exits with its code."""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix. `str(err)` says what is wrong and what to change."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
