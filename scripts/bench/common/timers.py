"""Stage timers: accumulated wall and CPU time of the package's functions, wrapped where
looked up."""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageTimer:
    """Accumulated wall time of functions, by wrapping them where the package looks them up.

    ``timer.wrap(module_or_class, "name")`` replaces the attribute by a timing wrapper (a
    function the package imports *inside* its callers is looked up at call time, so wrapping
    the defining module is enough; a name imported at module level must be wrapped in the
    importing module). Calls made from several threads add up: for stages run by a thread
    pool the total is thread-seconds, not wall time. Nested stages are each counted whole.
    """

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: CPU seconds of the calling thread inside each stage (threads the stage starts and
    #: native thread pools, e.g. OpenVINO's, are not counted).
    cpu_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spans: dict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: defaultdict(list))
    results: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    _undo: list[tuple[Any, str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, owner: Any, name: str, label: str | None = None, *,
             keep_result: bool = False) -> None:
        original = getattr(owner, name)
        label = label or name

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                result = original(*args, **kwargs)
            finally:
                t1, cpu1 = time.perf_counter(), time.thread_time()
                with self._lock:
                    self.seconds[label] += t1 - t0
                    self.cpu_seconds[label] += cpu1 - cpu0
                    self.calls[label] += 1
                    self.spans[label].append((t0, t1))
            if keep_result:
                with self._lock:
                    self.results[label].append(result)
            return result

        self._undo.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        while self._undo:
            owner, name, original = self._undo.pop()
            setattr(owner, name, original)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v, 4), "cpu_s": round(self.cpu_seconds[k], 4),
                    "calls": self.calls[k]}
                for k, v in self.seconds.items()}
