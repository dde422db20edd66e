"""A slide's trace memo is warmed when a client first opens it, so that the first stroke
re-traces only the chunks whose pixels it changed, not every chunk of the tumors it touches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import wsiseg.contours.trace as chunk_trace
from wsiseg.contours.cache import TRACES, TraceMemo
from wsiseg.qupath.text import RING_TEXTS
from wsiseg.serve import warm
from wsiseg.store import SlideStore

from servekit import GEOJSON_HEADERS, SLIDE_ID, border_stroke, client, export_of, make_run


def _changed_chunks(before: np.ndarray, after: np.ndarray, chunk: tuple[int, int]
                    ) -> set[tuple[int, int]]:
    rows, cols = np.nonzero(before != after)
    return {(int(r) // chunk[0] * chunk[0], int(c) // chunk[1] * chunk[1])
            for r, c in zip(rows, cols, strict=True)}


@pytest.mark.parametrize("warm", [True, False])
def test_the_first_stroke_after_opening_traces_only_the_chunks_it_changed(
        synth_slides, tmp_path, monkeypatch, warm):
    run = make_run(synth_slides[0], tmp_path / "run")
    store = SlideStore.open(run / f"{SLIDE_ID}.zarr")
    refined = store["refined"]
    before = np.asarray(refined[...])
    body = export_of(store, [(border_stroke(store, 0, length_px=120.0), "Tumor")])
    traced: list[tuple[int, int]] = []
    real = chunk_trace._trace_block

    def counting(mask, row0, col0):
        traced.append((row0, col0))
        return real(mask, row0, col0)

    with client(run, tmp_path / "scratch") as api:
        warmer = api.app.app.state.wsiseg.warmer  # the guard wraps the FastAPI app
        warmer.enabled = warm
        assert api.get(f"/slides/{SLIDE_ID}/contours").status_code == 200
        assert warmer.wait(SLIDE_ID, timeout_s=60) is warm
        assert (len(TRACES) > 0) is warm
        assert (len(RING_TEXTS._texts) > 0) is warm  # the contours' ring texts, written
        monkeypatch.setattr(chunk_trace, "_trace_block", counting)
        r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
        assert r.status_code == 200, r.text
        assert r.json()["refined"]
    changed = _changed_chunks(before, np.asarray(refined[...]), refined.chunks)
    assert traced and changed
    # warm: exactly what changed is traced; cold: the touched components' other chunks too
    assert (set(traced) <= changed) is warm


# -- the warmer's scheduling, with a tracing that the test controls ----------------------


class _Slide:
    def __init__(self, slide_id: str) -> None:
        self.id = slide_id


class _Tracing:
    """Stands for ``_trace_all``: records the slides traced; each waits for ``release``."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.ok = True

    def __call__(self, slide) -> bool:
        self.started.append(slide.id)
        assert self.release.wait(30)
        return self.ok


@pytest.fixture()
def tracing(monkeypatch) -> _Tracing:
    fake = _Tracing()
    monkeypatch.setattr(warm, "_trace_all", fake)
    return fake


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _warm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wsiseg-warm"]


def test_one_thread_warms_the_slide_opened_last_and_skips_those_opened_meanwhile(tracing):
    warmer = warm.TraceWarmer(memo=TraceMemo())
    tracing.release.clear()
    warmer.warm(_Slide("a"))  # being warmed ...
    _until(lambda: tracing.started == ["a"])
    for slide_id in ("b", "c", "d"):  # ... while three more are opened: d waits, b and c go
        warmer.warm(_Slide(slide_id))
    assert len(_warm_threads()) == 1
    tracing.release.set()
    assert warmer.wait("d", 30)
    assert warmer.wait("a", 30)
    assert not warmer.wait("b", 30) and not warmer.wait("c", 30)
    assert tracing.started == ["a", "d"]
    warmer.close()
    assert not _warm_threads()


def test_a_slide_is_warmed_again_only_when_the_memo_dropped_entries_since(tracing):
    memo = TraceMemo(budget_bytes=100)
    warmer = warm.TraceWarmer(memo=memo)
    warmer.warm(_Slide("a"))
    assert warmer.wait("a", 30)
    warmer.warm(_Slide("a"))
    assert warmer.wait("a", 30)
    assert tracing.started == ["a"]  # still whole: not traced again
    memo.put(b"x", None, 60)
    memo.put(b"y", None, 60)  # evicts x: whatever a held may be gone
    assert memo.evictions == 1
    warmer.warm(_Slide("a"))
    assert warmer.wait("a", 30)
    assert tracing.started == ["a", "a"]
    warmer.close()


def test_a_failed_warm_up_is_retried_on_the_next_opening(tracing):
    warmer = warm.TraceWarmer(memo=TraceMemo())
    tracing.ok = False
    warmer.warm(_Slide("a"))
    assert not warmer.wait("a", 30)
    tracing.ok = True
    warmer.warm(_Slide("a"))
    assert warmer.wait("a", 30)
    assert tracing.started == ["a", "a"]
    warmer.close()


def test_warm_never_raises_and_a_failed_thread_start_is_retried(tracing, monkeypatch):
    warmer = warm.TraceWarmer(memo=TraceMemo())
    real_start = threading.Thread.start

    def failing(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", failing)
    warmer.warm(_Slide("a"))  # logged, not raised
    assert not _warm_threads()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    warmer.warm(_Slide("a"))
    assert warmer.wait("a", 30)
    warmer.close()


def test_the_server_stops_its_warm_up_when_it_shuts_down(synth_slides, tmp_path, tracing):
    run = make_run(synth_slides[0], tmp_path / "run")
    tracing.release.clear()
    with client(run, tmp_path / "scratch") as api:
        warmer = api.app.app.state.wsiseg.warmer
        assert api.get(f"/slides/{SLIDE_ID}/contours").status_code == 200
        assert api.get(f"/view/{SLIDE_ID}").status_code == 200
        _until(lambda: tracing.started == [SLIDE_ID])
        # shutting down waits for the warm-up in progress (released here, as a trace ends)
        threading.Timer(0.2, tracing.release.set).start()
    assert not _warm_threads()
    assert tracing.started == [SLIDE_ID]  # the viewer page itself starts nothing
    warmer.warm(_Slide("b"))  # after shutdown: nothing starts
    assert not _warm_threads() and tracing.started == [SLIDE_ID]


def test_the_server_freezes_its_startup_objects_before_it_listens(synth_slides, tmp_path,
                                                                   monkeypatch):
    """Modules and models are never garbage: out of the collector's sight before the first
    stroke, so the full collections a round's bulk of geometries triggers do not walk them."""
    import gc

    import uvicorn

    from wsiseg.serve.main import ServeOptions, serve

    run = make_run(synth_slides[0], tmp_path / "run")
    frozen_when_listening: list[int] = []
    monkeypatch.setattr(uvicorn, "run",
                        lambda *a, **k: frozen_when_listening.append(gc.get_freeze_count()))
    gc.unfreeze()
    try:
        assert serve(ServeOptions(paths=[run], refiner="randomwalk", port=0)) == 0
    finally:
        gc.unfreeze()  # the test process's objects are the collector's again
    assert frozen_when_listening and frozen_when_listening[0] > 10_000


def test_reopening_the_slide_being_warmed_drops_the_one_waiting(tracing):
    """A, then B, then A again while A warms: A is the slide opened last, B is not warmed
    (it would only evict A's traces). Found by the second reader."""
    warmer = warm.TraceWarmer(memo=TraceMemo())
    tracing.release.clear()
    warmer.warm(_Slide("a"))
    _until(lambda: tracing.started == ["a"])
    warmer.warm(_Slide("b"))
    warmer.warm(_Slide("a"))
    tracing.release.set()
    assert warmer.wait("a", 30)
    assert not warmer.wait("b", 1)
    assert tracing.started == ["a"]
    warmer.close()


def test_a_warm_up_that_raises_does_not_leave_the_slide_marked_as_being_warmed(
        tracing, monkeypatch):
    warmer = warm.TraceWarmer(memo=TraceMemo())
    calls = []

    def broken(slide):
        calls.append(slide.id)
        if len(calls) == 1:
            raise RuntimeError("not from _trace_all's own handling")
        return True

    monkeypatch.setattr(warm, "_trace_all", broken)
    warmer.warm(_Slide("a"))
    assert not warmer.wait("a", 30)  # returns: the slide is no longer being warmed
    warmer.warm(_Slide("a"))  # and the thread still warms
    assert warmer.wait("a", 30) and calls == ["a", "a"]
    warmer.close()
