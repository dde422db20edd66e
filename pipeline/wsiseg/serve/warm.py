"""Warming a slide's trace memo when a client first opens it.

A round re-traces every chunk of each tumor component a stroke touches, except the chunks
whose pixels the process's memo (:mod:`wsiseg.contours.cache`) already holds. The memo fills
as rounds run, so without this the first stroke on a large tumor pays for all of it (2.8 s
instead of 1.3 s for the 60 000-vertex tumor of the 67-Mpx bench slide, docs/benchmarks.md
§7). Tracing the slide's current map once, on a background thread, when the viewer or QuPath
first asks for its contours, moves that cost to while the pathologist looks at the slide.
Nothing depends on it finishing: the memo is keyed by each chunk's pixels, so an entry is
right whenever it was made, and a failed warm-up only leaves the memo colder.
"""

from __future__ import annotations

import logging
import threading

from wsiseg.outputs import round_contours
from wsiseg.serve.registry import Slide

log = logging.getLogger(__name__)


class TraceWarmer:
    """Traces each slide's ``refined`` map once per server, in the background."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def warm(self, slide: Slide) -> None:
        """Start tracing ``slide`` unless it was started before (returns at once)."""
        if not self.enabled:
            return
        with self._lock:
            if slide.id in self._threads:
                return
            thread = threading.Thread(target=_trace_all, args=(slide,), daemon=True,
                                      name=f"wsiseg-warm-{slide.id}")
            self._threads[slide.id] = thread
        thread.start()

    def wait(self, slide_id: str, timeout_s: float | None = None) -> bool:
        """Whether ``slide_id``'s warm-up has finished (waiting up to ``timeout_s``)."""
        with self._lock:
            thread = self._threads.get(slide_id)
        if thread is None:
            return False
        thread.join(timeout_s)
        return not thread.is_alive()


def _trace_all(slide: Slide) -> None:
    try:
        store = slide.open("r")
        rows, cols = store.frame.working_shape
        # as a round traces (regions given: the memo is used), over the whole map
        round_contours(store, regions=[(0, 0, rows, cols)])
    except Exception as exc:  # noqa: BLE001 — only a colder memo; the round reports errors
        log.info("warming the traces of slide %s failed: %s", slide.id, exc)
