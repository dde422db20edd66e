"""``POST /slides/{id}/scribbles?contours=changed``: an answer that follows the change.

The default answer holds the slide's whole contours (its size, and the client's parsing,
grow with the slide); with ``contours=changed`` it holds only the features the round added,
each byte for byte as the latest GeoJSON holds it, and ``changed`` lists the removed ones,
so a client that had the previous round's contours has the new round's.
"""

from __future__ import annotations

import json

import pytest

from wsiseg.store import SlideStore

from servekit import GEOJSON_HEADERS, SLIDE_ID, border_stroke, client, export_of, make_run


@pytest.fixture()
def run(synth_slides, tmp_path):
    return make_run(synth_slides[0], tmp_path / "run")


def test_the_changed_answer_turns_the_previous_contours_into_the_new(run, tmp_path):
    store = SlideStore.open(run / f"{SLIDE_ID}.zarr")
    before = json.loads((run / f"{SLIDE_ID}.geojson").read_bytes())["features"]
    body = export_of(store, [(border_stroke(store, 0), "Tumor")])
    with client(run, tmp_path / "scratch") as api:
        r = api.post(f"/slides/{SLIDE_ID}/scribbles?contours=changed", content=body,
                     headers=GEOJSON_HEADERS)
        assert r.status_code == 200, r.text
        answer = r.json()
        bad = api.post(f"/slides/{SLIDE_ID}/scribbles?contours=some", content=body,
                       headers=GEOJSON_HEADERS)
        assert bad.status_code == 422
    latest_text = (run / f"{SLIDE_ID}.geojson").read_text()
    latest = json.loads(latest_text)["features"]
    added = answer["contours"]["features"]
    assert answer["refined"] and added
    assert [f["id"] for f in added] == [f["id"] for f in latest
                                        if f["id"] in set(answer["changed"]["added"])]
    assert sorted(f["id"] for f in added) == answer["changed"]["added"]
    for f in added:  # the file's own bytes
        assert json.dumps(f, separators=(",", ":"), ensure_ascii=False) in latest_text
    removed = set(answer["changed"]["removed"])
    applied = [f for f in before if f["id"] not in removed] + added
    assert sorted(applied, key=lambda f: f["id"]) == sorted(latest, key=lambda f: f["id"])
