"""The plugin core's user error."""

from __future__ import annotations


class PluginError(Exception):
    """A problem the user can fix (bad band mapping, unreadable model, ...): one line, problem then fix.

    The QGIS algorithms turn it into a ``QgsProcessingException`` carrying the same message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
