"""Command line: parse (:mod:`~wsiseg.cli.parser`), call the command
(:mod:`~wsiseg.cli.commands`, one thin function each, no logic), report.

Exit status: 0 when everything succeeded, 1 when some slide (or the command's input) failed,
2 for usage errors. A :class:`WsisegError` prints its one-line message, never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from wsiseg.cli.parser import build_parser
from wsiseg.config import mpp_problem
from wsiseg.errors import UsageError, WsisegError
from wsiseg.logs import configure_logging

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mpp = getattr(args, "mpp", None)
    if mpp is not None and (problem := mpp_problem(mpp)) is not None:
        print(f"error: --mpp: {problem}", file=sys.stderr)  # one line, as a usage error
        return 2
    configure_logging(args.verbose)
    if not args.verbose:
        warnings.filterwarnings("ignore")
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WsisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `wsiseg info ... | head` closed the pipe: nothing is wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
