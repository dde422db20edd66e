"""Where log lines go: one stderr handler, quiet by default.

Without ``-v`` the terminal gets wsiseg's warnings, Dask's warnings and other libraries'
errors; with ``-v`` also wsiseg's INFO lines and other libraries' warnings. Dask's INFO lines
(cluster start-up and shutdown chatter) never. TIAToolbox logs on the root logger and adds its
own handlers when the root logger has none, so this is set up before it is imported: by the
command line, and in each Dask worker process by :func:`configure_worker_logging`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

__all__ = ["configure_logging", "configure_worker_logging"]

_VERBOSE_ENV = "WSISEG_VERBOSE"  # the driver's -v, inherited by the worker processes it starts


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _quiet_filter(verbose: bool) -> Callable[[logging.LogRecord], bool]:
    """Which records reach the terminal: ours at WARNING (INFO with -v); Dask's at WARNING
    (its INFO lines are start-up chatter); every other library's at ERROR (WARNING with -v),
    e.g. TIAToolbox's root-logger lines about OME-TIFF metadata."""
    ours = logging.INFO if verbose else logging.WARNING
    libraries = logging.WARNING if verbose else logging.ERROR

    def keep(record: logging.LogRecord) -> bool:
        top = record.name.split(".", 1)[0]
        if top == "wsiseg":
            return record.levelno >= ours
        if top in ("distributed", "dask"):
            return record.levelno >= logging.WARNING
        return record.levelno >= libraries

    return keep


def configure_logging(verbose: bool) -> None:
    """One handler on the root logger, to stderr, filtered by :func:`_quiet_filter`."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)  # main() called again (tests): the new -v applies
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_quiet_filter(verbose))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ[_VERBOSE_ENV] = "1" if verbose else ""


def configure_worker_logging() -> None:
    """In a worker process, the driver's set-up, once (the driver's ``-v`` via the
    environment); nothing when this process is the driver itself."""
    if not any(isinstance(h, _StderrHandler) for h in logging.getLogger().handlers):
        configure_logging(bool(os.environ.get(_VERBOSE_ENV)))
