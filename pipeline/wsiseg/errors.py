"""The one exception family users see.

Every error a user can cause (a bad file, a bad option, bad weights) is a :class:`WsisegError`
whose message is one line naming the file and what is wrong. The CLI prints it without a
traceback and exits with status 1 (per slide) or 2 (usage).
"""

from __future__ import annotations


class WsisegError(Exception):
    """A user-facing error with a one-line message."""


class UsageError(WsisegError):
    """The command line itself is wrong (exit status 2)."""


class StoreError(WsisegError):
    """A slide store is missing, damaged, of another format, busy or read-only."""
