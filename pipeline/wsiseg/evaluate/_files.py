"""Atomic text/bytes writes and CSV text, shared by the evaluation reports."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_write_bytes


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of dict rows (header from the first row's keys; floats rounded to 5 decimals)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically (:func:`wsiseg.atomic.atomic_write_bytes`), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
