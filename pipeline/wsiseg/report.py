"""``<out>/report.html``: the cohort at a glance, one row per slide of the run ledger.

Plain HTML with inline CSS, no script: each row shows the slide's thumbnail with its contours
(the ``<slide-id>.png`` written by the run, linked relatively so the folder can be moved or
served as is), a link to its GeoJSON, tumor area and fraction, the number of tumor foci, its
time, status and reason; the head of the page gives the run totals (slides per hour).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_write_text
from wsiseg.ledger import STATUSES, Ledger, LedgerEntry, now_iso

REPORT_NAME = "report.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left;
         vertical-align: middle; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 240px; max-height: 180px; display: block; }
.done { color: #176b2c; } .failed { color: #b00020; font-weight: bold; }
.pending, .running { color: #8a6d00; }
.reason { max-width: 40em; font-size: 90%; }
"""


def write_report(
    out_dir: Path, ledger: Ledger, names: set[str] | None = None, location: str | None = None
) -> Path:
    """Write ``out_dir/report.html`` atomically from ``ledger``; returns its path.

    ``names``: the files present where the report will be read (default: those in
    ``out_dir``), so that it links only outputs that exist; ``location``: the output location
    shown in the title (default: ``out_dir``), e.g. the ``s3://`` URL the report is uploaded to.
    """
    out_dir = Path(out_dir)
    if names is None:
        names = {p.name for p in out_dir.iterdir()}
    text = render_report(location or str(out_dir), ledger, names)
    path = out_dir / REPORT_NAME
    atomic_write_text(path, text)
    return path


def render_report(location: str, ledger: Ledger, names: set[str]) -> str:
    """The report's HTML text; links are relative and point only at files in ``names``."""
    entries = [ledger.entries[k] for k in sorted(ledger.entries)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>wsiseg cohort report: {_e(location.rstrip('/').rsplit('/', 1)[-1])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>wsiseg cohort: {_e(location)}</h1>",
        _totals_html(ledger),
        "<table><thead><tr><th>thumbnail</th><th>slide</th><th>status</th>"
        "<th>tumor mm²</th><th>tumor fraction</th><th>tissue mm²</th><th>foci</th>"
        "<th>seconds</th><th>attempts</th><th>worker</th><th>reason</th></tr></thead><tbody>",
    ]
    parts += [_row_html(names, e) for e in entries]
    parts += ["</tbody></table>", f"<p>Written {_e(now_iso())}.</p>", "</body></html>", ""]
    return "\n".join(parts)


def run_totals(ledger: Ledger) -> dict[str, Any]:
    """Figures of the last run: wall seconds, slides done by it, slides per hour."""
    if not ledger.runs:
        return {}
    last = ledger.runs[-1]
    wall_s = last.get("wall_s")
    done = last.get("done", 0)
    per_hour = done / wall_s * 3600.0 if wall_s and done else None
    return {"wall_s": wall_s, "done": done, "failed": last.get("failed", 0),
            "skipped": last.get("skipped", 0), "slides_per_hour": per_hour,
            "workers": last.get("workers"), "cluster": last.get("cluster", "")}


def _totals_html(ledger: Ledger) -> str:
    counts = ledger.totals()
    status = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    in_task = [e.seconds for e in ledger.entries.values() if e.status == "done" and e.seconds]
    items = [f"<li>{len(ledger.entries)} slides: {_e(status)}</li>"]
    if in_task:
        items.append(f"<li>in-task time of done slides: {sum(in_task):.1f} s, "
                     f"{sum(in_task) / len(in_task):.1f} s per slide</li>")
    t = run_totals(ledger)
    if t:
        rate = "" if t["slides_per_hour"] is None else f", {t['slides_per_hour']:.1f} slides/hour"
        wall = "interrupted" if t["wall_s"] is None else f"{t['wall_s']:.1f} s"
        items.append(
            f"<li>last run: {t['done']} slides computed, {t['skipped']} already done, "
            f"{t['failed']} failed in {_e(wall)}{rate}; {_e(str(t['cluster']))}</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _row_html(names: set[str], e: LedgerEntry) -> str:
    thumb, geojson = f"{e.slide_id}.png", f"{e.slide_id}.geojson"
    img = (f'<a href="{_e(thumb)}"><img src="{_e(thumb)}" alt="{_e(e.slide_id)}">'
           "</a>" if e.status == "done" and thumb in names else "")
    name = _e(e.slide_id)
    if e.status == "done" and geojson in names:
        name = f'<a href="{_e(geojson)}">{name}</a>'
    m = e.measurements
    cells = [
        f"<td>{img}</td>",
        f'<td>{name}<br><small>{_e(e.slide)}</small></td>',
        f'<td class="{_e(e.status)}">{_e(e.status)}</td>',
        _num(m.get("tumor_mm2"), "{:.3f}"),
        _num(m.get("tumor_fraction"), "{:.1%}"),
        _num(m.get("tissue_mm2"), "{:.3f}"),
        _num(m.get("foci"), "{:d}"),
        _num(e.seconds, "{:.1f}"),
        _num(e.attempts, "{:d}"),
        f"<td>{_e(e.worker)}</td>",
        f'<td class="reason">{_e(e.reason)}</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _num(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return '<td class="num"></td>'
    try:
        text = fmt.format(value)
    except (ValueError, TypeError):
        text = str(value)
    return f'<td class="num">{_e(text)}</td>'


def _e(text: str) -> str:
    return html.escape(text, quote=True)
