"""``POST /slides/{id}/scribbles?contours=changed`` (and ``/undo?contours=changed``): an
answer that follows the change.

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


def apply_delta(features: list[dict], answer: dict) -> list[dict]:
    """What a client does with a ``contours=changed`` answer: drop the removed ids, add the
    added features."""
    removed = set(answer["changed"]["removed"])
    return [f for f in features if f["id"] not in removed] + answer["contours"]["features"]


def by_id(features: list[dict]) -> dict[str, dict]:
    return {f["id"]: f for f in features}


def test_a_round_then_an_undo_followed_by_their_deltas(run, tmp_path):
    store = SlideStore.open(run / f"{SLIDE_ID}.zarr")
    body = export_of(store, [(border_stroke(store, 0), "Tumor")])
    with client(run, tmp_path / "scratch") as api:
        shown = api.get(f"/slides/{SLIDE_ID}/contours").json()["features"]
        r0 = by_id(shown)
        r = api.post(f"/slides/{SLIDE_ID}/scribbles?contours=changed", content=body,
                     headers=GEOJSON_HEADERS)
        assert r.status_code == 200, r.text
        shown = apply_delta(shown, r.json())
        assert by_id(shown) == by_id(api.get(f"/slides/{SLIDE_ID}/contours").json()["features"])
        assert by_id(shown) != r0

        u = api.post(f"/slides/{SLIDE_ID}/undo?contours=changed", json={})
        assert u.status_code == 200, u.text
        undo = u.json()
        assert (undo["round"], undo["previous_round"]) == (0, 1)
        # Only what round 0 has and round 1 had not: not the whole slide.
        assert len(undo["contours"]["features"]) < len(r0)
        assert sorted(f["id"] for f in undo["contours"]["features"]) == undo["changed"]["added"]
        shown = apply_delta(shown, undo)
        latest = api.get(f"/slides/{SLIDE_ID}/contours").json()["features"]
        assert len(shown) == len(by_id(shown)) == len(latest)
        assert by_id(shown) == by_id(latest) == r0

        bad = api.post(f"/slides/{SLIDE_ID}/undo?contours=some", json={})
        assert bad.status_code == 422
        full = api.post(f"/slides/{SLIDE_ID}/scribbles", content=body, headers=GEOJSON_HEADERS)
        assert full.status_code == 200 and full.json()["round"] == 1
        whole = api.post(f"/slides/{SLIDE_ID}/undo", json={}).json()  # the default: all
        assert by_id(whole["contours"]["features"]) == r0
