"""User-facing errors.

Every problem caused by the user's input (a bad path, an unknown band, a checkpoint of another
architecture, ...) raises :class:`ExploraGeoError` with ONE line that names the bad value and says what to do
next. The CLI prints that line and exits with status 2, without a traceback. Anything else that escapes is a
bug and keeps its traceback.
"""

from __future__ import annotations


class ExploraGeoError(Exception):
    """An error the user can fix. ``str(err)`` is a single line: the problem, then the fix."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
