"""``wsiseg serve``: the routes, the round files, the tiles, the guards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg.serve.tiles import Pyramid
from wsiseg.session import refine_store
from wsiseg.store import SlideStore

from servekit import (
    GEOJSON_HEADERS,
    SLIDE_ID,
    border_stroke,
    client,
    copy_run,
    export_of,
    make_run,
)
from storekit import assert_unchanged, store_snapshot


@pytest.fixture(scope="module")
def template(synth_slides, tmp_path_factory):
    return make_run(synth_slides[0], tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture()
def run(template, tmp_path):
    return copy_run(template, tmp_path / "run")


@pytest.fixture()
def api(run, tmp_path):
    with client(run, tmp_path / "scratch") as c:
        yield c


def store_of(run: Path) -> SlideStore:
    return SlideStore.open(run / f"{SLIDE_ID}.zarr")


def test_lists_slides_and_schema(api):
    slides = api.get("/slides").json()
    assert [s["id"] for s in slides] == [SLIDE_ID]
    s = slides[0]
    assert s["round"] == 0 and s["rounds"] == 1 and s["size"] == [4096, 3072]
    assert s["working_size"] == [1024, 768] and s["tumor_mm2"] > 0
    schema = api.get("/openapi.json").json()
    assert "/slides/{slide_id}/scribbles" in schema["paths"]


def test_contours_are_the_files_bytes(api, run):
    r = api.get(f"/slides/{SLIDE_ID}/contours")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/geo+json")
    assert r.content == (run / f"{SLIDE_ID}.geojson").read_bytes()
    r0 = api.get(f"/slides/{SLIDE_ID}/contours", params={"round": 0})
    assert r0.content == (run / f"{SLIDE_ID}.r0.geojson").read_bytes()
    again = api.get(f"/slides/{SLIDE_ID}/contours", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert api.get(f"/slides/{SLIDE_ID}/contours", params={"round": 5}).status_code == 404
    assert api.get("/slides/nope/contours").status_code == 404


def test_a_served_round_writes_what_refine_writes(api, run, template, tmp_path):
    store = store_of(run)
    body = export_of(store, [(border_stroke(store, 0), "Tumor"),
                             (border_stroke(store, 1), "Stroma")])
    r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["round"] == 1 and answer["previous_round"] == 0 and answer["refined"]
    assert answer["new_pixels"] > 0 and answer["windows"] >= 1
    assert answer["changed"]["added"] and answer["timings"]["round_s"] > 0
    assert answer["contours"] == json.loads((run / f"{SLIDE_ID}.geojson").read_bytes())

    # The same export through `wsiseg refine` on a copy of the run: the same files.
    twin = copy_run(template, tmp_path / "twin")
    export = tmp_path / "export.geojson"
    export.write_bytes(body)
    assert refine_store(twin / f"{SLIDE_ID}.zarr", export, refiner="randomwalk") == 0
    names = sorted(p.name for p in run.iterdir())
    assert names == sorted(p.name for p in twin.iterdir())
    for name in names:
        if name.endswith((".geojson", ".png")):
            assert (run / name).read_bytes() == (twin / name).read_bytes(), name
    served, cli = store_of(run), store_of(twin)
    for array in ("refined", "scribbles", "guide"):
        np.testing.assert_array_equal(served[array][...], cli[array][...])
    strip = ("time", "scribble_file", "seconds", "refine_seconds")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in served.attrs["rounds"]]
            == [{k: v for k, v in r.items() if k not in strip} for r in cli.attrs["rounds"]])
    assert not list((tmp_path / "scratch").iterdir())  # the posted body is not kept

    # The same body again: nothing new, as `wsiseg refine` says for the same export.
    again = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
    assert again.status_code == 200 and again.json()["round"] == 1
    assert not again.json()["refined"] and "nothing new" in again.json()["message"]

    history = api.get(f"/slides/{SLIDE_ID}/history").json()
    assert [h["round"] for h in history] == [0, 1] and history[1]["windows"] >= 1


def test_undo_restores_the_previous_round(api, run):
    before = (run / f"{SLIDE_ID}.geojson").read_bytes()
    store = store_of(run)
    body = export_of(store, [(border_stroke(store, 2), "Tumor")])
    assert api.post(f"/slides/{SLIDE_ID}/scribbles", content=body,
                    headers=GEOJSON_HEADERS).json()["round"] == 1
    assert (run / f"{SLIDE_ID}.geojson").read_bytes() != before
    r = api.post(f"/slides/{SLIDE_ID}/undo", json={})
    assert r.status_code == 200 and r.json()["round"] == 0
    assert (run / f"{SLIDE_ID}.geojson").read_bytes() == before
    assert r.json()["contours"] == json.loads(before)
    nothing = api.post(f"/slides/{SLIDE_ID}/undo", json={})
    assert nothing.status_code == 409 and "nothing to undo" in nothing.json()["detail"]


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "request body: not valid JSON"),
    (b'{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
     b'{"type": "Polygon", "coordinates": [[[0, 0], [1e300, "x"]]]}}]}', "request body: "),
    (b"", "request body: file is empty"),
])
def test_malformed_geojson_is_refused_and_changes_nothing(api, run, body, reason):
    store = store_of(run)
    before = store_snapshot(store, run)
    r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith(reason) and "\n" not in detail and "Traceback" not in r.text
    assert "posted" not in detail  # the scratch file is not named
    assert_unchanged(store_of(run), run, before)


def test_another_slides_export_is_refused(api, run):
    store = store_of(run)
    import shapely

    far = shapely.LineString([(-500, -500), (-400, -450)])  # off the slide entirely
    r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=export_of(store, [(far, "Tumor")]),
                 headers=GEOJSON_HEADERS)
    assert r.status_code == 422 and "outside the slide" in r.json()["detail"]


def test_tiles(api, run):
    store = store_of(run)
    dzi = api.get(f"/slides/{SLIDE_ID}/image.dzi")
    assert dzi.status_code == 200 and 'Width="1024" Height="768"' in dzi.text
    top = Pyramid(1024, 768).top
    assert top == 10
    t = api.get(f"/slides/{SLIDE_ID}/image_files/{top}/1_1.jpeg")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    img = np.asarray(Image.open(__import__("io").BytesIO(t.content)))
    assert img.shape == (256, 256, 3)
    expect = np.moveaxis(np.asarray(store["image"][:, 256:512, 256:512]), 0, -1).astype(float)
    assert np.abs(img.astype(float) - expect).mean() < 6  # JPEG
    assert api.get(f"/slides/{SLIDE_ID}/image_files/{top}/1_1.jpeg",
                   headers={"If-None-Match": t.headers["etag"]}).status_code == 304
    whole = api.get(f"/slides/{SLIDE_ID}/image_files/{top - 2}/0_0.jpeg")
    assert Image.open(__import__("io").BytesIO(whole.content)).size == (256, 192)
    assert api.get(f"/slides/{SLIDE_ID}/image_files/{top}/9_9.jpeg").status_code == 404
    assert api.get(f"/slides/{SLIDE_ID}/image_files/{top + 1}/0_0.jpeg").status_code == 404
    assert api.get(f"/slides/{SLIDE_ID}/image_files/3/0_0.png").status_code == 404
    assert api.get(f"/slides/{SLIDE_ID}/secret.dzi").status_code == 404

    heat = api.get(f"/slides/{SLIDE_ID}/heatmap_files/{top - 2}/0_0.png")
    assert heat.status_code == 200
    rgba = np.asarray(Image.open(__import__("io").BytesIO(heat.content)))
    assert rgba.shape == (192, 256, 4)
    body = export_of(store, [(border_stroke(store, 0), "Stroma")])
    api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
    after = api.get(f"/slides/{SLIDE_ID}/heatmap_files/{top - 2}/0_0.png",
                    headers={"If-None-Match": heat.headers["etag"]})
    assert after.status_code == 200 and after.headers["etag"] != heat.headers["etag"]
    # The image is the same after a round: its tile is still the browser's.
    assert api.get(f"/slides/{SLIDE_ID}/image_files/{top}/1_1.jpeg",
                   headers={"If-None-Match": t.headers["etag"]}).status_code == 304


def test_downsampled_tiles_are_means_of_the_store():
    from wsiseg.serve.tiles import TileCache, TileSource

    class FakeStore:
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, name):
            return self.arr

    rng = np.random.default_rng(0)
    prob = rng.integers(0, 256, (700, 517), dtype=np.uint8)
    src = TileSource(FakeStore(prob), "heatmap", "v", TileCache(2**20), "x")
    top = src.pyramid.top  # 10: 700 × 517 → level 9 is 350 × 259
    t9 = src.pixels(top - 1, 0, 0)
    np.testing.assert_allclose(t9[:100, :100], prob[:200, :200].reshape(100, 2, 100, 2)
                               .mean(axis=(1, 3)), atol=0.51)
    t0 = src.pixels(0, 0, 0)
    assert t0.shape == (1, 1)
    assert src.cache.bytes <= 2**20


def test_guards(run, tmp_path):
    with client(run, tmp_path / "scratch", token="s3cret") as c:
        assert c.get("/slides").status_code == 401
        assert c.get("/slides", headers={"X-Wsiseg-Token": "wrong"}).status_code == 401
        assert c.get("/slides", headers={"X-Wsiseg-Token": "s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page shell holds no data
        assert c.get("/openapi.json").status_code == 200
    with client(run, tmp_path / "scratch", max_body_mb=0.001) as c:
        store = store_of(run)
        before = store_snapshot(store, run)
        big = b'{"type": "FeatureCollection", "features": []' + b" " * 2000 + b"}"
        r = c.post(f"/slides/{SLIDE_ID}/scribbles", content=big, headers=GEOJSON_HEADERS)
        assert r.status_code == 413
        r = c.post(f"/slides/{SLIDE_ID}/scribbles", content=b"{}",
                   headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = c.get("/slides", headers={"Host": "evil.example:8765"})
        assert r.status_code == 403
        for bad in ("..%2F..%2Fetc", "%2e%2e", f"{SLIDE_ID}.zarr", "../s0"):
            assert c.get(f"/slides/{bad}/contours").status_code == 404, bad
        assert_unchanged(store_of(run), run, before)


def test_non_loopback_host_gets_a_token(run, tmp_path):
    from wsiseg.serve.main import ServeOptions, build_app

    _, token, _ = build_app(ServeOptions(paths=[run], host="0.0.0.0", refiner="randomwalk"),
                            tmp_path)
    assert token and len(token) >= 24
    _, none, _ = build_app(ServeOptions(paths=[run], refiner="randomwalk"), tmp_path)
    assert none is None


def test_cli_and_server_mix(api, run, tmp_path):
    """A round run by `wsiseg refine` beside the server is served; the server undoes it."""
    store = store_of(run)
    before = (run / f"{SLIDE_ID}.geojson").read_bytes()
    heat = api.get(f"/slides/{SLIDE_ID}/heatmap_files/8/0_0.png")
    export = tmp_path / "export.geojson"
    export.write_bytes(export_of(store, [(border_stroke(store, 1), "Stroma")]))
    assert refine_store(run / f"{SLIDE_ID}.zarr", export, refiner="randomwalk") == 0
    assert api.get(f"/slides/{SLIDE_ID}").json()["round"] == 1
    assert (api.get(f"/slides/{SLIDE_ID}/contours").content
            == (run / f"{SLIDE_ID}.geojson").read_bytes() != before)
    assert [h["round"] for h in api.get(f"/slides/{SLIDE_ID}/history").json()] == [0, 1]
    again = api.get(f"/slides/{SLIDE_ID}/heatmap_files/8/0_0.png",
                    headers={"If-None-Match": heat.headers["etag"]})
    assert again.status_code == 200  # the heat map is not served stale
    r = api.post(f"/slides/{SLIDE_ID}/undo", json={})
    assert r.status_code == 200 and r.json()["round"] == 0
    assert (run / f"{SLIDE_ID}.geojson").read_bytes() == before


def test_refinenet_is_loaded_once_and_serves_rounds(run, tmp_path, monkeypatch):
    import wsiseg.runtime
    from wsiseg.nets import init_weights

    weights = tmp_path / "refinenet.safetensors"
    init_weights("refinenet", weights, seed=0, workflow=store_of(run).workflow)
    loads = []
    original = wsiseg.runtime.load_network  # what make_refiner loads RefineNet through
    monkeypatch.setattr(wsiseg.runtime, "load_network",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    with client(run, tmp_path / "scratch", refiner=None, refinenet=str(weights),
                device="cpu") as api:
        store = store_of(run)
        for k, cls in ((0, "Tumor"), (1, "Stroma")):
            body = export_of(store, [(border_stroke(store, k), cls)])
            r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
            assert r.status_code == 200, r.text
            assert r.json()["refiner"] == "refinenet" and r.json()["round"] == k + 1
            assert r.json()["timings"]["network_s"] > 0
    assert len(loads) == 1  # at start, not per round


def test_the_report_links_each_slide_to_its_viewer(api, run):
    from wsiseg.ledger import Ledger
    from wsiseg.report import write_report

    assert api.get("/report.html").status_code == 404  # this run wrote none
    ledger = Ledger.load(run)
    ledger.mark_done_before(SLIDE_ID, "slide.tiff", {"tumor_mm2": 1.0})
    on_disk = write_report(run, ledger).read_bytes()
    r = api.get("/report.html")
    assert r.status_code == 200
    assert f'href="/view/{SLIDE_ID}"' in r.text and f'href="{SLIDE_ID}.geojson"' not in r.text
    assert f'src="/slides/{SLIDE_ID}/thumbnail"' in r.text
    assert (run / "report.html").read_bytes() == on_disk  # the file is not changed
    assert 'href="/report.html"' in api.get("/").text
