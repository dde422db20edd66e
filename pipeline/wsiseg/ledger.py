"""The run ledger: what happened to every slide of a cohort, in ``<out>/ledger.json``.

One entry per slide id: its status (``pending`` → ``running`` → ``done`` | ``failed``), the
one-line reason of a failure, how many times a worker started it (``attempts``, counted over
all runs of the directory), the seconds its last attempt took inside the worker, which worker
ran it, when it started and finished, and its measurements (for the report).

The ledger *records*; it does not decide. Whether a slide is done is decided by its slide
store and outputs (:func:`wsiseg.cohort.run_cohort` checks them), so a ledger that was lost or
edited never causes work to be skipped or repeated wrongly. Only the process driving a run
writes the ledger (workers report to it), always atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_write_text
from wsiseg.errors import WsisegError

LEDGER_NAME = "ledger.json"
LEDGER_FORMAT = 1
STATUSES = ("pending", "running", "done", "failed")


def now_iso() -> str:
    """Local time with its UTC offset, to the millisecond (ISO 8601)."""
    t = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
    return f"{stamp}.{int(t % 1 * 1000):03d}{time.strftime('%z', time.localtime(t))}"


@dataclass
class LedgerEntry:
    """One slide's record. ``seconds`` is in-task time of the last attempt (not queueing)."""

    slide_id: str
    slide: str
    status: str = "pending"
    reason: str = ""
    attempts: int = 0
    seconds: float | None = None
    worker: str = ""
    started: str = ""
    finished: str = ""
    updated: str = ""
    measurements: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LedgerEntry:
        known = {f.name for f in fields(cls)}
        entry = cls(**{k: v for k, v in d.items() if k in known})
        if entry.status not in STATUSES:
            raise ValueError(f"unknown status {entry.status!r}")
        return entry


@dataclass
class Ledger:
    """The ledger of one output directory; change it with the methods, then :meth:`save`."""

    path: Path
    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    # -- reading and writing ------------------------------------------------------------------
    @classmethod
    def load(cls, out_dir: Path) -> Ledger:
        """The ledger of ``out_dir`` (empty when there is none yet).

        Raises
        ------
        WsisegError
            The file exists but is not a ledger (names the file and what is wrong).
        """
        path = Path(out_dir) / LEDGER_NAME
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = {k: LedgerEntry.from_dict(v) for k, v in data["slides"].items()}
            runs = list(data.get("runs", []))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WsisegError(
                f"{path}: not a wsiseg run ledger ({type(exc).__name__}: {exc}); move it "
                "aside and rerun (slides already done are still skipped)"
            ) from None
        return cls(path, entries, runs)

    def save(self) -> None:
        """Write the ledger atomically (a reader sees the old or the new file, never half)."""
        data = {
            "format": LEDGER_FORMAT,
            "updated": now_iso(),
            "totals": dict(self.totals()),
            "runs": self.runs,
            "slides": {k: asdict(self.entries[k]) for k in sorted(self.entries)},
        }
        text = json.dumps(data, indent=1, allow_nan=False, default=_jsonable)
        atomic_write_text(self.path, text)

    # -- transitions ----------------------------------------------------------------------------
    def entry(self, slide_id: str, slide: str) -> LedgerEntry:
        """The entry of ``slide_id``, created ``pending`` if new (the slide path is updated)."""
        entry = self.entries.get(slide_id)
        if entry is None:
            entry = self.entries[slide_id] = LedgerEntry(slide_id, slide, updated=now_iso())
        entry.slide = slide
        return entry

    def mark_pending(self, slide_id: str, slide: str) -> LedgerEntry:
        """Queue a slide for this run (keeps its attempts and last timings)."""
        entry = self.entry(slide_id, slide)
        entry.status, entry.reason, entry.updated = "pending", "", now_iso()
        return entry

    def mark_done_before(
        self, slide_id: str, slide: str, measurements: dict[str, Any]
    ) -> LedgerEntry:
        """A slide found done (store + outputs) before this run: recorded, not recomputed.

        An entry already ``done`` is left exactly as it was (timestamps, attempts, seconds).
        """
        entry = self.entry(slide_id, slide)
        if entry.status != "done":
            entry.status, entry.reason, entry.updated = "done", "", now_iso()
            entry.measurements = _finite(measurements)
        return entry

    def mark_started(self, slide_id: str, worker: str, started: str | None = None) -> None:
        """A worker started the slide (one more attempt)."""
        entry = self.entries.get(slide_id)
        if entry is None:
            return
        entry.status, entry.worker = "running", worker
        entry.attempts += 1
        entry.started = entry.updated = started or now_iso()

    def mark_finished(
        self, slide_id: str, *, ok: bool, reason: str = "", seconds: float | None = None,
        worker: str = "", measurements: dict[str, Any] | None = None,
    ) -> None:
        """The slide's task returned (``ok``) or failed for good (``reason``)."""
        entry = self.entries[slide_id]
        if entry.attempts == 0:  # the start was not heard (a worker died before sending it)
            entry.attempts = 1
        entry.status = "done" if ok else "failed"
        entry.reason = "" if ok else reason
        entry.seconds = seconds
        entry.worker = worker or entry.worker
        entry.finished = entry.updated = now_iso()
        if ok:
            entry.measurements = _finite(measurements or {})

    def mark_interrupted(self) -> list[str]:
        """Ctrl-C: slides still running go back to ``pending``; returns their ids."""
        back = []
        for entry in self.entries.values():
            if entry.status == "running":
                entry.status, entry.reason, entry.updated = "pending", "interrupted", now_iso()
                back.append(entry.slide_id)
        return back

    # -- reading --------------------------------------------------------------------------------
    def totals(self) -> Counter[str]:
        counts: Counter[str] = Counter({s: 0 for s in STATUSES})
        counts.update(e.status for e in self.entries.values())
        return counts


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """Drop values JSON cannot hold (NaN, inf) rather than write an invalid ledger."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not (v == v and abs(v) != float("inf")):
            continue
        out[k] = v
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def format_status(ledger: Ledger, run_gone: str | None = None) -> str:
    """The ledger as a text table: slide, status, attempts, seconds, reason; then totals.

    ``run_gone``: the run that left slides ``running`` is no longer alive (killed; see
    :func:`wsiseg.cohort.print_status`), described; those slides are shown ``interrupted``
    with the reason, and a closing line says a rerun redoes them.
    """
    rows = [("slide", "status", "attempts", "seconds", "reason")]
    stale = []
    for key in sorted(ledger.entries):
        e = ledger.entries[key]
        seconds = "" if e.seconds is None else f"{e.seconds:.1f}"
        status, reason = e.status, e.reason
        if run_gone is not None and status == "running":
            status, reason = "interrupted", "its run is gone; a rerun will redo it"
            stale.append(e.slide_id)
        rows.append((e.slide_id, status, str(e.attempts), seconds, reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]),
                   r[3].rjust(widths[3]), r[4]]).rstrip()
        for r in rows
    ]
    counts = ledger.totals()
    done_s = [e.seconds for e in ledger.entries.values() if e.status == "done" and e.seconds]
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    lines.append(f"{len(ledger.entries)} slides: {summary}")
    if done_s:
        lines.append(f"in-task time of done slides: {sum(done_s):.1f} s "
                     f"({sum(done_s) / len(done_s):.1f} s per slide)")
    if ledger.runs:
        last = ledger.runs[-1]
        end = last.get("finished") or "still running or interrupted"
        lines.append(f"last run: started {last.get('started', '?')}, finished {end}")
    if stale:
        lines.append(f"{len(stale)} slides marked running belong to a run that is gone "
                     f"({run_gone}): it was killed or its machine stopped; run the same "
                     "`wsiseg run` again to redo them (done slides are kept)")
    return "\n".join(lines)
