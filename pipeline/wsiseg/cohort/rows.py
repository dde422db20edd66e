"""The rows of a run: options, one summary row per slide, ``summary.csv``."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wsiseg.atomic import atomic_write_text

log = logging.getLogger(__name__)


SUMMARY_FIELDS = (
    "slide", "slide_id", "status", "reason", "tissue_mm2", "tumor_mm2", "tumor_fraction",
    "seconds", "runtime", "precision",
)


@dataclass(frozen=True)
class RunOptions:
    """Options of ``wsiseg run``.

    ``out_dir`` is a path, a ``file://`` URL or another fsspec URL. ``workers``: ``None``
    sizes a LocalCluster to the machine (a single-worker cluster runs in this process
    instead), ``0`` runs in this process, ``N`` starts N workers (at most one per GPU).
    ``threads_per_worker``: slides a worker runs at once (default 1). ``scheduler`` joins an
    existing Dask cluster.
    """

    out_dir: Path | str
    workflow: str | None = None
    guidenet: str | None = None
    mpp: float | None = None
    device: str = "auto"
    force: bool = False
    scheduler: str | None = None
    tta: bool = False
    export_mask: bool = False
    progress: bool = True
    workers: int | None = None
    threads_per_worker: int | None = None
    runtime: str | None = None  # None: the workflow's inference.runtime
    precision: str | None = None  # None: the workflow's inference.precision


@dataclass
class SlideRow:
    slide: str
    slide_id: str
    status: str  # "done" | "skipped" (already done) | "failed"
    reason: str = ""
    tissue_mm2: float | None = None
    tumor_mm2: float | None = None
    tumor_fraction: float | None = None
    seconds: float = 0.0
    runtime: str = ""  # the inference runtime GuideNet ran on (openvino, torch)
    precision: str = ""  # what it computed in (f32, bf16, fp16)
    extra: dict = field(default_factory=dict)

    def csv_row(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("extra")
        return {k: "" if d[k] is None else str(d[k]) for k in SUMMARY_FIELDS}




def write_summary(path: Path, rows: Sequence[SlideRow]) -> None:
    """Write ``summary.csv`` atomically, keeping rows of slides not in this run."""
    previous: dict[str, dict[str, str]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("slide_id"):
                    previous[r["slide_id"]] = {k: r.get(k, "") for k in SUMMARY_FIELDS}
    for row in rows:
        previous[row.slide_id] = row.csv_row()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(previous):
        writer.writerow(previous[key])
    atomic_write_text(path, buf.getvalue())
