"""The interactive evaluation's report: summary CSV, Table 1 beside the paper's, IoU curves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from wsiseg.evaluate._files import csv_text, write_bytes, write_text
from wsiseg.evaluate.interactive import InteractiveResult, percent_label

__all__ = ["PAPER_TABLE1", "markdown_table", "write_interactive_report"]

#: DeepScribble Table 1 (20 PAIP 2019 patches with GuideNet IoU 0.50–0.75, RTX 2080Ti):
#: method → (share reaching 85 % within 20, NoI@85, NoI@90, total s, SPI s).
PAPER_TABLE1: dict[str, tuple[float, float, float, float, float]] = {
    "WS": (0.5, 8.1, 11.1, 33.0, 0.7),
    "RW": (0.7, 7.1, 6.5, 47.0, 1.4),
    "BRS": (0.5, 4.5, 4.7, 104.0, 1.7),
    "f-BRS": (0.4, 5.5, 6.6, 39.0, 0.5),
    "DeepScribble (RefineNet)": (0.8, 6.4, 5.9, 36.0, 0.6),
}


def write_interactive_report(
    result: InteractiveResult,
    out_dir: Path,
    *,
    title: str = "Interactive evaluation",
    stem: str = "interactive",
    paper: bool = True,
) -> dict[str, Path]:
    """Write the summary CSV, the Markdown table, the curves (CSV, PNG) and per-window CSV.

    Files (written atomically) in ``out_dir``: ``<stem>.csv`` (one row per method, see
    :meth:`InteractiveResult.summary`), ``<stem>.md`` (the paper's Table 1 layout, with the
    paper's own rows under it when ``paper``), ``<stem>_curve.csv`` (mean IoU per method and
    interaction), ``<stem>_windows.csv`` (IoU per method, window and interaction) and
    ``<stem>_curve.png`` (mean IoU against interactions, one line per method).

    Returns
    -------
    dict of str to Path
        ``summary_csv``, ``table_md``, ``curve_csv``, ``windows_csv``, ``curve_png``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result.summary()
    paths = {
        "summary_csv": out_dir / f"{stem}.csv",
        "table_md": out_dir / f"{stem}.md",
        "curve_csv": out_dir / f"{stem}_curve.csv",
        "windows_csv": out_dir / f"{stem}_windows.csv",
        "curve_png": out_dir / f"{stem}_curve.png",
    }
    write_text(paths["summary_csv"], csv_text(rows))
    write_text(paths["table_md"], markdown_table(result, title=title, paper=paper))
    k_range = range(result.max_interactions + 1)
    curve_rows = [
        {"method": name, "interaction": k, "mean_iou": round(float(v), 5)}
        for name in result.methods
        for k, v in zip(k_range, result.mean_curve(name), strict=True)
    ]
    write_text(paths["curve_csv"], csv_text(curve_rows))
    window_rows = [
        {"method": name, "window": wname, "interaction": k, "iou": round(float(v), 5),
         "seconds": round(float(trace.seconds[w, k - 1]), 4) if k else 0.0,
         "scribble_px": int(trace.scribble_px[w, k - 1]) if k else 0}
        for name, trace in result.methods.items()
        for w, wname in enumerate(result.windows)
        for k, v in zip(k_range, trace.iou[w], strict=True)
    ]
    write_text(paths["windows_csv"], csv_text(window_rows))
    _plot_curves(result, paths["curve_png"], title)
    return paths


def markdown_table(
    result: InteractiveResult, *, title: str = "Interactive evaluation", paper: bool = True
) -> str:
    """The summary as a Markdown table in the layout of DeepScribble's Table 1."""
    first = percent_label(result.targets[0])
    nois = [f"NoI@{percent_label(t)}" for t in result.targets]
    head = ["Method", f"≤{result.max_interactions} @{first}", *nois, "Time, s", "SPI, s",
            "IoU start → end"]
    lines = [
        f"### {title}",
        "",
        f"{len(result.windows)} windows, ≤ {result.max_interactions} interactions, scribbles ≤ "
        f"{100 * result.settings.get('max_scribble_fraction', 0):.2f} % of a window's pixels.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in result.summary():
        cells = [row["method"], f"{row[f'reach@{first}']:.2f}"]
        cells += [f"{row[c]:.1f}" for c in nois]
        cells += [f"{row['total_s']:.1f}", f"{row['spi_s']:.3f}",
                  f"{row['iou_start']:.3f} → {row['iou_end']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if paper:
        lines += [
            "",
            "DeepScribble Table 1 (20 PAIP 2019 patches, GuideNet IoU 0.50–0.75, RTX 2080Ti):",
            "",
            "| Method | ≤20 @85 | NoI@85 | NoI@90 | Time, s | SPI, s |",
            "|---|---|---|---|---|---|",
        ]
        for name, (reach, n85, n90, total, spi) in PAPER_TABLE1.items():
            lines.append(f"| {name} | {reach:.1f} | {n85:.1f} | {n90:.1f} | {total:.0f} | "
                         f"{spi:.1f} |")
    return "\n".join(lines) + "\n"


def _plot_curves(result: InteractiveResult, path: Path, title: str) -> None:
    """Mean IoU per interaction, one line per method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot()
    k = np.arange(result.max_interactions + 1)
    for name in result.methods:
        curve = result.mean_curve(name)
        ax.plot(k, curve, marker="o", markersize=3, label=f"{name} ({curve[1:].mean():.3f})")
    for t in result.targets:
        ax.axhline(t, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("interactions")
    ax.set_ylabel("mean IoU")
    ax.set_xlim(0, result.max_interactions)
    ax.set_xticks(k[:: max(1, len(k) // 10)])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="method (mean IoU)", title_fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
