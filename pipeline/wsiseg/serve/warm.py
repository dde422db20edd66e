"""Warming the trace memo (and the ring texts) for the slide a client opens.

A round re-traces every chunk of each tumor component a stroke touches, except the chunks
whose pixels the process's memo (:mod:`wsiseg.contours.cache`) already holds. The memo fills
as rounds run, so without this the first stroke on a large tumor pays for all of it (2.8 s
instead of 0.7 s for the 60 000-vertex tumor of the 67-Mpx bench slide, docs/benchmarks.md
§7). When a client fetches a slide's contours (the viewer on loading; the QuPath script on
its first run for the image), the slide's current map is traced once on a background
thread, so the strokes that follow find their chunks traced, and its contours' ring texts
written (:func:`~wsiseg.qupath.text.remembering_ring_texts`), so the first stroke on a
large tumor writes only the rings it changed. The viewer and the QuPath
script in live mode fetch them before any stroke is drawn; a one-shot run of the QuPath
script fetches them right before its first round, which then runs beside the warm-up (as
cold as without it; the rounds after are warm).

One thread warms one slide at a time: the one opened last. A slide opened while another is
being warmed waits, replacing any slide already waiting: warming slides nobody looks at
would only evict the traces of the one being corrected from the one bounded memo. A slide is
warmed again when it is opened again after the memo dropped entries (another slide's
warm-up or rounds may have evicted its traces). Nothing depends on a warm-up finishing: the
memo is keyed by each chunk's pixels, so an entry is right whenever it was made, and a failed
warm-up only leaves the memo colder.
"""

from __future__ import annotations

import logging
import threading

from wsiseg.contours.cache import TRACES, TraceMemo
from wsiseg.errors import WsisegError
from wsiseg.outputs import annotations_for, round_contours
from wsiseg.qupath import annotation_features
from wsiseg.qupath.text import remembering_ring_texts
from wsiseg.serve.registry import Slide

log = logging.getLogger(__name__)


class TraceWarmer:
    """Traces the slide a client opened last into the trace memo, in the background.

    Parameters
    ----------
    enabled : bool
        False: :meth:`warm` does nothing (a server that only answers the CLI's clients).
    memo : TraceMemo
        The memo the rounds read (the process's :data:`~wsiseg.contours.cache.TRACES`).
    """

    def __init__(self, enabled: bool = True, memo: TraceMemo = TRACES) -> None:
        self.enabled = enabled
        self._memo = memo
        self._changed = threading.Condition()
        self._waiting: Slide | None = None
        self._current: str | None = None
        # slide id → the memo's eviction count when its warm-up ended: while the count has
        # not moved, everything it traced is still there
        self._warmed: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def warm(self, slide: Slide) -> None:
        """Warm ``slide`` next (returns at once; never raises: a failure only leaves the
        memo colder)."""
        if not self.enabled:
            return
        try:
            with self._changed:
                if self._closed:
                    return
                if slide.id == self._current:  # being warmed, and again the one opened last
                    self._waiting = None
                    return
                if self._warmed.get(slide.id) == self._memo.evictions:
                    return  # warmed, and nothing was evicted since
                self._waiting = slide
                if self._thread is None:
                    thread = threading.Thread(target=self._work, name="wsiseg-warm",
                                              daemon=True)
                    thread.start()
                    self._thread = thread  # only once started: a failed start is retried
                self._changed.notify_all()
        except Exception:  # noqa: BLE001 — a page or a contour file must still be served
            log.warning("cannot warm the traces of slide %s", slide.id, exc_info=True)

    def wait(self, slide_id: str, timeout_s: float | None = None) -> bool:
        """Whether a warm-up of ``slide_id`` has finished: waits up to ``timeout_s`` while
        it is being warmed or waits to be; False at once when it is neither and was never
        warmed. (The memo may have dropped some of its entries since.)"""
        def settled() -> bool:
            waiting = self._waiting is not None and self._waiting.id == slide_id
            return not waiting and self._current != slide_id

        with self._changed:
            return self._changed.wait_for(settled, timeout_s) and slide_id in self._warmed

    def close(self, timeout_s: float = 10.0) -> None:
        """Warm nothing more; wait up to ``timeout_s`` for a warm-up in progress to end
        (tracing cannot be interrupted; the thread is a daemon, so it never holds up exit)."""
        with self._changed:
            self._closed = True
            self._waiting = None
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._waiting is not None)
                if self._closed:
                    return
                slide, self._waiting = self._waiting, None
                assert slide is not None
                self._current = slide.id
            warmed = False
            try:
                warmed = _trace_all(slide)
            except Exception:  # noqa: BLE001 — not this thread's to report: log it whole
                log.warning("warming the traces of slide %s failed", slide.id, exc_info=True)
            finally:  # whatever happens, the slide is no longer being warmed
                with self._changed:
                    if warmed:
                        self._warmed[slide.id] = self._memo.evictions
                    self._current = None
                    self._changed.notify_all()


def _trace_all(slide: Slide) -> bool:
    """Trace ``slide``'s current ``refined`` map as a round would; whether it was (False:
    the store could not be read; other errors are raised)."""
    try:
        store = slide.open("r")
        rows, cols = store.frame.working_shape
        # as a round traces (regions given: the memo is read and filled), over the whole map
        polygons, means = round_contours(store, regions=[(0, 0, rows, cols)])
        # and writes: the rings' texts, which a round writing a changed tumor finds
        with remembering_ring_texts():
            annotation_features(annotations_for(store, polygons, 0, slide.id, means))
        return True
    except WsisegError as exc:  # a store being written, gone, or bad: its round will say so
        log.info("warming the traces of slide %s failed: %s", slide.id, exc)
    return False
