"""The ``measurements.csv`` table: one row per (slide, round), merged into what is there."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from wsiseg.atomic import atomic_write_bytes
from wsiseg.errors import WsisegError
from wsiseg.rounds import polygons_of_round
from wsiseg.store import SlideStore

MEASUREMENT_FIELDS = (
    "slide_id", "round", "tissue_mm2", "tumor_mm2", "tumor_fraction", "foci",
    "largest_focus_mm2",
)


def measurement_row(store: SlideStore, slide_id: str, round_k: int) -> dict[str, str]:
    """The ``measurements.csv`` row of one round: :func:`wsiseg.outputs.measurements` of the
    round's stored polygons, formatted as ``summary.csv`` formats numbers (``str``)."""
    from wsiseg.outputs import measurements

    m = asdict(measurements(store, polygons_of_round(store, round_k), round_k))
    m["slide_id"] = slide_id
    return {k: str(m[k]) for k in MEASUREMENT_FIELDS}


def _read_measurements(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    if not path.exists():
        return rows
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"slide_id", "round"} <= set(reader.fieldnames):
                raise WsisegError(
                    f"{path}: exists but is not a wsiseg measurements table (no slide_id, round "
                    f"columns); move it away or choose another --out"
                )
            for r in reader:
                rows[(r["slide_id"], r["round"])] = {k: r.get(k) or "" for k in MEASUREMENT_FIELDS}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsisegError(f"{path}: cannot read the measurements table ({exc})") from None
    return rows


def measurement_conflicts(path: Path, rows: Iterable[dict[str, str]]) -> list[str]:
    """Rows of ``path`` that the new rows would change (same slide and round, other figures)."""
    old = _read_measurements(path)
    return [
        f"{r['slide_id']} round {r['round']}"
        for r in rows
        if (r["slide_id"], r["round"]) in old and old[(r["slide_id"], r["round"])] != r
    ]


def write_measurements_csv(path: Path, rows: Iterable[dict[str, str]]) -> Path:
    """Merge rows into ``measurements.csv`` (keyed by slide and round), written atomically.

    Rows of other slides and rounds are kept; rows are sorted by slide id, then round.
    """
    merged = _read_measurements(path)
    for r in rows:
        merged[(r["slide_id"], r["round"])] = dict(r)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MEASUREMENT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(merged, key=lambda k: (k[0], _as_int(k[1]))):
        writer.writerow(merged[key])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1
