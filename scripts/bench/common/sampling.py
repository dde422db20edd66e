"""Samplers run in a thread beside the work: peak memory (RSS + children's USS), GPU use."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

MIB = 2**20


class PeakRSS:
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

        self._proc = psutil.Process(pid or os.getpid())
        self.interval_s = interval_s
        self.children = children
        self.start_mib = 0.0
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

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

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.sample_mib())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start_mib = self.peak_mib = self.sample_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = max(self.peak_mib, self.sample_mib())
        self._stop.set()
        self._thread.join()


class GpuUtilisation:
    """GPU utilisation (%) sampled in a thread: ``torch.cuda.utilization`` (NVML), else
    ``nvidia-smi``. ``samples`` holds ``(perf_counter time, percent)``."""

    def __init__(self, interval_s: float = 0.1, device: int = 0) -> None:
        self.interval_s = interval_s
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)

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

    def _run(self) -> None:
        read = self._read()
        while read is not None and not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.perf_counter(), read()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuUtilisation:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, spans: Sequence[tuple[float, float]] | None = None) -> float | None:
        """Mean utilisation, over all samples or those inside ``spans``."""
        values = [u for t, u in self.samples
                  if spans is None or any(a <= t <= b for a, b in spans)]
        return sum(values) / len(values) if values else None
