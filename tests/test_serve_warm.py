"""A slide's trace memo is warmed when a client first opens it, so that the first stroke
re-traces only the chunks whose pixels it changed, not every chunk of the tumors it touches."""

from __future__ import annotations

import numpy as np
import pytest

import wsiseg.contours.merge as merge
from wsiseg.contours.cache import TRACES
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
    TRACES.clear()  # the memo is the process's: other tests may have traced these pixels
    traced: list[tuple[int, int]] = []
    real = merge._trace_block

    def counting(mask, row0, col0):
        traced.append((row0, col0))
        return real(mask, row0, col0)

    with client(run, tmp_path / "scratch") as api:
        warmer = api.app.app.state.wsiseg.warmer  # the guard wraps the FastAPI app
        warmer.enabled = warm
        assert api.get(f"/slides/{SLIDE_ID}/contours").status_code == 200
        assert warmer.wait(SLIDE_ID, timeout_s=60) is warm
        assert (len(TRACES) > 0) is warm
        monkeypatch.setattr(merge, "_trace_block", counting)
        r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
        assert r.status_code == 200, r.text
        assert r.json()["refined"]
    changed = _changed_chunks(before, np.asarray(refined[...]), refined.chunks)
    assert traced and changed
    # warm: exactly what changed is traced; cold: the touched components' other chunks too
    assert (set(traced) <= changed) is warm
