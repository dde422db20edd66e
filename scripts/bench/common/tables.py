"""Reporting a benchmark: the command line, the machine, Markdown tables and stage rows."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command_line() -> str:
    """The command that reproduces this run, relative to the repository root when inside."""
    def rel(p: str) -> str:
        with contextlib.suppress(ValueError):
            return str(Path(p).absolute().relative_to(REPO))
        return p

    python = rel(sys.executable)
    return shlex.join([python, rel(sys.argv[0]), *sys.argv[1:]])


def machine_info() -> dict[str, str]:
    """CPU model and cores, memory, Python, torch, device, wsiseg version and git commit."""
    import psutil
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": f"{cpu}, {usable} usable cores ({os.cpu_count()} logical)",
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
    }
    with contextlib.suppress(OSError):
        info["load average"] = " ".join(Path("/proc/loadavg").read_text().split()[:3]) + \
            " (1, 5, 15 min, at the end of the run: other work on the machine)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    try:
        import wsiseg

        info["wsiseg"] = wsiseg.__version__
    except ImportError:
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            info["commit"] = commit + (" (+ uncommitted changes)" if dirty else "")
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned (floats as given: format them first)."""
    def numeric(col: int) -> bool:
        cells = [r[col] for r in rows if r[col] not in ("", None, "–")]
        return bool(cells) and all(
            isinstance(c, int | float) or _looks_numeric(str(c)) for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    text = text.replace("×", "").replace("%", "").replace(",", "").strip()
    try:
        float(text)
    except ValueError:
        return False
    return True


def print_report(title: str, tables: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> None:
    """The command line, the machine, then each (caption, table), then notes, on stdout."""
    print(f"\n## {title}\n")
    print(f"`{command_line()}`\n")
    for key, value in machine_info().items():
        print(f"- {key}: {value}")
    for caption, table in tables:
        print(f"\n{caption}\n\n{table}" if caption else f"\n{table}")
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


def stage_rows(stages: dict, infer_stats: list[dict], total_s: float) -> list[list]:
    """Where the pipeline's time goes: wall stages, thread-seconds, the calling thread's CPU
    seconds, and the infer breakdown (columns stage, calls, seconds, CPU-s, share)."""
    rows = []
    for label, v in stages.items():
        share = f"{100 * v['seconds'] / total_s:.0f} %" if "(wall)" in label else ""
        rows.append([label, v["calls"], fmt(v["seconds"], 2), fmt(v.get("cpu_s"), 2), share])
    for key in ("forward_s", "read_s", "write_s", "wait_s"):
        total = sum(s[key] for s in infer_stats)
        rows.append([f"infer: {key[:-2]}" + (" (thread-s)" if key in ("read_s", "write_s")
                                              else ""), "", fmt(total, 2), "", ""])
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
