"""Samplers run in a thread beside the work: peak memory (RSS + children's USS), GPU use,
CPU by thread."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MIB = 2**20
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


class _Sampler:
    """:meth:`sample` every ``interval_s`` on a daemon thread, inside a ``with`` block."""

    def __init__(self, interval_s: float, name: str) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _first(self) -> bool:
        """Called once on the thread before the samples; False: there is nothing to sample."""
        return True

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        if not self._first():
            return
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakRSS(_Sampler):
    """Peak memory of a process (and its children), sampled in a thread with psutil.

    A sample is the process's resident set (RSS) plus, for each child process (e.g. a
    DataLoader worker), its unique set (USS: the pages only it holds), so pages a forked
    worker shares with its parent are counted once.

    Parameters
    ----------
    pid : int, optional
        The process to watch (default: this one). Watch a child only after it has exec'ed:
        a freshly forked child still shows its parent's pages.
    interval_s : float
        Sampling period; peaks shorter than this can be missed.
    children : bool
        Add the children's unique memory.

    Attributes
    ----------
    start_mib, peak_mib : float
        Memory when sampling began, and the largest sample, MiB.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.02,
                 children: bool = True) -> None:
        import psutil

        super().__init__(interval_s, "peak-rss")
        self._proc = psutil.Process(pid or os.getpid())
        self.children = children
        self.start_mib = 0.0
        self.peak_mib = 0.0

    def sample_mib(self) -> float:
        import psutil

        try:
            total = self._proc.memory_info().rss
        except psutil.Error:  # the process has ended
            return 0.0
        if self.children:
            with contextlib.suppress(psutil.Error):
                for child in self._proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_full_info().uss
        return total / MIB

    def sample(self) -> None:
        self.peak_mib = max(self.peak_mib, self.sample_mib())

    def __enter__(self) -> PeakRSS:
        self.start_mib = self.peak_mib = self.sample_mib()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        self.sample()
        super().__exit__(*exc)


class GpuUtilisation(_Sampler):
    """GPU utilisation (%) sampled in a thread: ``torch.cuda.utilization`` (NVML), else
    ``nvidia-smi``. ``samples`` holds ``(perf_counter time, percent)``."""

    def __init__(self, interval_s: float = 0.1, device: int = 0) -> None:
        super().__init__(interval_s, "gpu-util")
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self.error = ""
        self._reader: Callable[[], float] | None = None

    def _read(self) -> Callable[[], float] | None:
        import torch

        try:
            torch.cuda.utilization(self.device)
            self.source = "torch.cuda.utilization (NVML)"
            return lambda: float(torch.cuda.utilization(self.device))
        except Exception as exc:  # no pynvml / nvidia-ml-py
            self.error = f"torch.cuda.utilization: {exc}"

        def smi() -> float:
            out = subprocess.run(
                ["nvidia-smi", f"--id={self.device}", "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5,
            )
            return float(out.stdout.strip().splitlines()[0])

        try:
            smi()
            self.source = "nvidia-smi"
            return smi
        except Exception as exc:
            self.error += f"; nvidia-smi: {exc}"
            return None

    def _first(self) -> bool:
        self._reader = self._read()
        return self._reader is not None

    def sample(self) -> None:
        with contextlib.suppress(Exception):
            self.samples.append((time.perf_counter(), self._reader()))

    def mean(self, spans: Sequence[tuple[float, float]] | None = None) -> float | None:
        """Mean utilisation, over all samples or those inside ``spans``."""
        values = [u for t, u in self.samples
                  if spans is None or any(a <= t <= b for a, b in spans)]
        return sum(values) / len(values) if values else None


class ThreadCPU(_Sampler):
    """CPU seconds of this process's threads by name while in the ``with`` block, read from
    ``/proc/self/task`` (Linux) every ``interval_s``: a thread that ends between two readings
    is undercounted; a thread Python did not start is named ``native`` (e.g. OpenVINO's)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        super().__init__(interval_s, "bench-sampler")
        self._seen: dict[str, tuple[str, float]] = {}  # tid → (name, CPU s)
        self._start = {tid: cpu for tid, (_, cpu) in self._read({}).items()}

    def _read(self, names: dict[int, str]) -> dict[str, tuple[str, float]]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            name = names.get(int(tid)) or self._seen.get(tid, ("native",))[0]
            out[tid] = (name, (int(fields[11]) + int(fields[12])) * _TICK_S)
        return out

    def sample(self) -> None:
        names = {t.native_id: t.name.rstrip("0123456789_-") for t in threading.enumerate()
                 if t.native_id is not None}
        self._seen.update(self._read(names))

    def by_name(self) -> dict[str, float]:
        """CPU seconds per thread name since the sampler was made."""
        total: Counter[str] = Counter()
        for tid, (name, cpu) in self._seen.items():
            total[name] += cpu - self._start.get(tid, 0.0)
        return dict(total)
