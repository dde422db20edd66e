"""The browser page of ``wsiseg serve`` in a real browser: Playwright driving Debian's
Chromium. A stroke drawn with the mouse across a tumor border makes a round and changes the
contour layer; undo brings it back. The page follows each answer's change
(``?contours=changed``) and draws what a full ``GET .../contours`` holds; when another client
moved the slide in between, it fetches the whole round. Screenshots are kept in the test's
tmp folder (printed)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from wsiseg.serve.page import VENDOR_OSD
from wsiseg.store import SlideStore

from servekit import GEOJSON_HEADERS, SLIDE_ID, border_stroke, export_of, live_server, make_run

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture()
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    if not (VENDOR_OSD / "openseadragon.min.js").exists():
        pytest.skip("OpenSeadragon not built (make web)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def contour_paths(page) -> list[str]:
    return page.eval_on_selector_all("#contours path", "ps => ps.map(p => p.getAttribute('d'))")


def drawn_ids(page) -> list[str]:
    return page.eval_on_selector_all("#contours path", "ps => ps.map(p => p.dataset.id)")


def served_ids(url: str) -> list[str]:
    """The ids of a full GET /contours, fetched by the test (not by the page)."""
    with urllib.request.urlopen(f"{url}/slides/{SLIDE_ID}/contours") as r:
        return [f["id"] for f in json.load(r)["features"]]


def assert_page_shows_the_served_round(page, url: str) -> None:
    ids = drawn_ids(page)
    assert len(ids) == len(set(ids)) == int(page.get_attribute("#contours", "data-count"))
    assert sorted(ids) == sorted(served_ids(url))


def test_draw_a_stroke_then_undo(browser, synth_slides, tmp_path, small_workflow):
    run = make_run(synth_slides[0], tmp_path / "run", small_workflow)
    store = SlideStore.open(run / f"{SLIDE_ID}.zarr")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    with live_server(run, tmp_path / "scratch") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        asked: list[str] = []  # the page's contour requests: "METHOD path?query"
        page.on("request", lambda r: asked.append(f"{r.method} {r.url.removeprefix(url)}"))
        contour_gets = f"GET /slides/{SLIDE_ID}/contours"

        page.goto(url + "/")
        page.wait_for_selector(f"tr[data-slide='{SLIDE_ID}'] img", timeout=30_000)
        page.screenshot(path=str(shots / "0-slides.png"))

        page.click(f"a[href='/view/{SLIDE_ID}']")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('#contours path').length > 0")
        page.wait_for_load_state("networkidle")
        before = contour_paths(page)
        assert page.get_attribute("#contours", "data-round") == "0"
        page.screenshot(path=str(shots / "1-round0.png"))

        # A Tumor stroke across a tumor border, drawn with the mouse.
        line = border_stroke(store, 0, length_px=80)
        along = [line.interpolate(t, normalized=True) for t in (0, 0.25, 0.5, 0.75, 1.0)]
        pts = [page.evaluate("([x, y]) => window.wsisegView.imageToPage(x, y)", [p.x, p.y])
               for p in along]
        page.click("#brush-tumor")
        page.mouse.move(*pts[0])
        page.mouse.down()
        for xy in pts[1:]:
            page.mouse.move(*xy, steps=4)
        page.mouse.up()
        page.wait_for_selector("#contours[data-round='1']", timeout=120_000)
        page.wait_for_function("document.body.dataset.rounds === '2'")
        after = contour_paths(page)
        assert after != before
        assert_page_shows_the_served_round(page, url)
        assert f"POST /slides/{SLIDE_ID}/scribbles?contours=changed" in asked
        assert asked.count(contour_gets) == 1  # the first view only: the stroke's delta did
        history = json.loads(page.evaluate(
            "id => fetch(`/slides/${id}/history`).then(r => r.text())", SLIDE_ID))
        assert [h["round"] for h in history] == [0, 1]
        assert history[1]["scribbles"]["tumor"] == 1 and history[1]["new_pixels"] > 0
        page.click("#heat")
        page.wait_for_function("window.wsisegView.heatLoaded()", timeout=60_000)
        page.wait_for_timeout(1000)  # OpenSeadragon fades new tiles in
        page.screenshot(path=str(shots / "2-round1-heatmap.png"))

        page.click("#undo")
        page.wait_for_selector("#contours[data-round='0']", timeout=60_000)
        page.wait_for_function("document.body.dataset.rounds === '1'")
        assert sorted(contour_paths(page)) == sorted(before)
        assert_page_shows_the_served_round(page, url)
        assert f"POST /slides/{SLIDE_ID}/undo?contours=changed" in asked
        assert asked.count(contour_gets) == 1
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / "3-undone.png"))

        # Another client makes round 1 behind the page's back; the page's undo answer then
        # starts from round 1, not from the round 0 it shows: it fetches the whole round.
        other = urllib.request.Request(
            f"{url}/slides/{SLIDE_ID}/scribbles", headers=GEOJSON_HEADERS,
            data=export_of(store, [(border_stroke(store, 1), "Tumor")]))
        with urllib.request.urlopen(other) as r:
            assert json.load(r)["round"] == 1
        page.click("#undo")  # the status says "undoing…" until the answer is shown
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('undo: round')", timeout=60_000)
        page.wait_for_load_state("networkidle")
        assert page.get_attribute("body", "data-rounds") == "1"
        assert page.get_attribute("#contours", "data-round") == "0"
        assert asked.count(contour_gets) == 2
        assert sorted(contour_paths(page)) == sorted(before)
        assert_page_shows_the_served_round(page, url)
        assert errors == []
