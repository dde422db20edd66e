"""Command-line pieces every benchmark script shares: sizes, cache and scratch folders."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` → ``(W, H)`` level-0 pixels."""
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def default_cache() -> Path:
    """Where generated slides are kept between runs (``$WSISEG_BENCH_CACHE`` overrides)."""
    env = os.environ.get("WSISEG_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wsiseg-bench"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="folder of generated slides, reused between runs "
                             "(default: $WSISEG_BENCH_CACHE or ~/.cache/wsiseg-bench)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for stores and outputs (default: a temp dir, "
                             "removed at the end)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated slides")


@contextlib.contextmanager
def scratch(work: Path | None, prefix: str) -> Iterator[Path]:
    """``work`` as given (kept), or a temporary folder removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
