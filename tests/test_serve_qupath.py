"""What ``scripts/qupath/wsiseg_live.groovy`` relies on, from Python: the files QuPath 0.6's
own writer produced are accepted as POSTed, and the answer imports as QuPath expects."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import shapely

from wsiseg.store import SlideStore

from conftest import QUPATH_FIXTURES, REPO
from qupath_rules import validate_feature_collection
from servekit import (
    GEOJSON_HEADERS,
    SLIDE_ID,
    border_stroke,
    client,
    copy_run,
    export_of,
    live_server,
    make_run,
)

WRITTEN = QUPATH_FIXTURES / "written-0.6"
SCRIPT = REPO / "scripts" / "qupath" / "wsiseg_live.groovy"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# What the script reads from a round's answer (keep in step with wsiseg_live.groovy).
ANSWER_KEYS = {"round", "previous_round", "refined", "new_pixels", "windows",
               "tumor_mm2_before", "tumor_mm2", "changed", "timings", "contours"}


@pytest.fixture(scope="module")
def qupath_template(synth_slides, tmp_path_factory):
    import dataclasses

    from wsiseg.config import load_workflow

    wf = load_workflow()
    wf = wf.replace(tiling=dataclasses.replace(wf.tiling, chunk_px=256))
    run = make_run(synth_slides[0], tmp_path_factory.mktemp("qupath") / "run", wf)
    store = SlideStore.open(run / f"{SLIDE_ID}.zarr")
    # The fixtures belong to a notional slide: call all of this one tissue, so none of
    # their strokes is refused as "another slide's export".
    store["tissue"][...] = True
    return run


@pytest.fixture()
def qupath_run(qupath_template, tmp_path):
    return copy_run(qupath_template, tmp_path / "run")


def check_imports_in_qupath(collection: dict, store: SlideStore) -> None:
    """The rules QuPath's importer applies, and what the script expects of each contour."""
    assert validate_feature_collection(collection, bounds=store.frame.level0_size) == []
    wf = store.workflow
    for f in collection["features"]:
        assert UUID.match(f["id"])
        p = f["properties"]
        assert p["objectType"] == "annotation" and p["isLocked"] is True
        assert p["classification"]["name"] == wf.contours.class_name
        assert len(p["classification"]["color"]) == 3
        assert p["metadata"]["source"] == "wsiseg"
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and geom.area > 0


# The same objects in every container QuPath's export dialog offers.
SAME_OBJECTS = [
    ("scribbles-fc-pretty.geojson", "application/json"),
    ("scribbles-array.geojson", "application/geo+json"),
    ("scribbles-array-pretty.geojson", "application/geo+json"),
    ("scribbles-fc-nomeas.geojson", "application/geo+json"),
    ("scribbles-fc.geojson.gz", "application/gzip"),
    ("scribbles-fc.zip", "application/zip"),
    ("single-feature.geojson", "application/geo+json"),  # one of them
]


@pytest.mark.parametrize("first", ["scribbles-fc.geojson", "extras-2d-fc.geojson"])
def test_posting_what_qupath_writes(qupath_run, tmp_path, first):
    store = SlideStore.open(qupath_run / f"{SLIDE_ID}.zarr")
    r0 = json.loads((qupath_run / f"{SLIDE_ID}.geojson").read_bytes())
    with client(qupath_run, tmp_path / "scratch") as api:
        slides = api.get("/slides").json()
        assert [s["id"] for s in slides] == [SLIDE_ID]  # the script matches the image name
        r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=(WRITTEN / first).read_bytes(),
                     headers=GEOJSON_HEADERS)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer.keys() >= ANSWER_KEYS
        assert answer["refined"] and answer["round"] == 1 and answer["new_pixels"] > 0
        # The script imports GET /contours: exactly the file, and what the answer holds.
        latest = api.get(f"/slides/{SLIDE_ID}/contours")
        assert json.loads(latest.content) == answer["contours"]
        if first == "scribbles-fc.geojson":
            for name, content_type in SAME_OBJECTS:  # accepted, and nothing new in them
                again = api.post(f"/slides/{SLIDE_ID}/scribbles",
                                 content=(WRITTEN / name).read_bytes(),
                                 headers={"Content-Type": content_type})
                assert again.status_code == 200, (name, again.text)
                assert again.json()["round"] == 1 and not again.json()["refined"], name
    check_imports_in_qupath(answer["contours"], store)
    # Contours away from the strokes keep their ids (the script keeps them as they are).
    old_ids = {f["id"] for f in r0["features"]}
    new_ids = {f["id"] for f in answer["contours"]["features"]}
    assert set(answer["changed"]["removed"]) == old_ids - new_ids
    assert set(answer["changed"]["added"]) == new_ids - old_ids
    before = {f["id"]: f for f in r0["features"]}
    for f in answer["contours"]["features"]:
        if f["id"] in before:  # a kept id is the very same contour
            assert f == before[f["id"]]


def test_a_non_tumor_area_inside_tumor_comes_back_as_a_hole(qupath_run, tmp_path):
    from scipy import ndimage

    store = SlideStore.open(qupath_run / f"{SLIDE_ID}.zarr")
    guide = np.asarray(store["guide"][...])
    depth = ndimage.distance_transform_edt(np.pad(guide >= 128, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(depth), depth.shape)  # deep inside the largest focus
    assert depth[y, x] > 25
    disc = shapely.Point(x, y).buffer(12)
    with client(qupath_run, tmp_path / "scratch") as api:
        r = api.post(f"/slides/{SLIDE_ID}/scribbles", content=export_of(store, [(disc, "Stroma")]),
                     headers=GEOJSON_HEADERS)
    assert r.status_code == 200, r.text
    collection = r.json()["contours"]
    check_imports_in_qupath(collection, store)
    centre = shapely.Point(store.frame.working_to_qupath([x, y]))
    around = [shapely.geometry.shape(f["geometry"]) for f in collection["features"]]
    holed = [g for g in around if g.convex_hull.contains(centre)]
    assert holed and not any(g.contains(centre) for g in holed)
    assert any(len(p.interiors) for g in holed for p in shapely.get_parts(g))


def test_the_script_uses_only_what_the_server_offers():
    """The routes, header and answer fields the Groovy script names exist."""
    script = SCRIPT.read_text()
    for route in ("'/slides'", '"/slides/${slideId}/contours"',
                  '"/slides/${slideId}/scribbles?contours=changed"'):
        assert route in script
    assert "X-Wsiseg-Token" in script and "application/geo+json" in script
    for key in re.findall(r"answer\.(\w+)", script):
        assert key in ANSWER_KEYS | {"message"}, key
    assert "removeListener" in script and "addListener" in script


def test_the_qupath_scripts_parse(tmp_path):
    """The Groovy scripts parse (with the system's Groovy, when there is one)."""
    groovy, env = _groovy()
    scripts = sorted((REPO / "scripts" / "qupath").glob("*.groovy"))
    out = subprocess.run([groovy, str(REPO / "tests" / "fixtures" / "groovy_parse_check.groovy"),
                          *map(str, scripts)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok: ") == len(scripts), out.stdout


def _groovy() -> tuple[str, dict[str, str]]:
    groovy = shutil.which("groovy")
    if groovy is None:
        pytest.skip("no groovy command (apt-get install groovy) to run the script with")
    env = dict(os.environ)
    if not Path("/usr/lib/jvm/default-java/bin/java").exists():
        jdks = sorted(Path("/usr/lib/jvm").glob("java-*-openjdk-*/bin/java"))
        if jdks:
            env["JAVA_HOME"] = str(jdks[-1].parents[1])
    return groovy, env


def test_the_live_script_against_a_server(qupath_run, tmp_path):
    """wsiseg_live.groovy itself, run by Groovy with stand-ins for QuPath's classes
    (tests/fixtures/qupath_stub): one round, then nothing new, then live mode on, a stroke
    drawn (the listener sends it: a second round), and live mode off."""
    groovy, env = _groovy()
    store = SlideStore.open(qupath_run / f"{SLIDE_ID}.zarr")
    r0 = json.loads((qupath_run / f"{SLIDE_ID}.geojson").read_bytes())
    stroke = json.loads(export_of(store, [(border_stroke(store, 1), "Tumor")]))["features"]
    hierarchy = tmp_path / "hierarchy.json"
    hierarchy.write_text(json.dumps(r0["features"] + stroke))  # as after import_wsiseg
    later = tmp_path / "stroke.json"
    later.write_text(json.dumps(json.loads(export_of(store, [(border_stroke(store, 2),
                                                              "Stroma")]))["features"]))
    out = tmp_path / "after.json"
    stub = REPO / "tests" / "fixtures" / "qupath_stub"
    with live_server(qupath_run, tmp_path / "scratch") as url:
        run = subprocess.run(
            [groovy, "-cp", str(stub), str(stub / "run_script.groovy"), str(SCRIPT),
             str(hierarchy), str(out), url, f"{SLIDE_ID}.svs", "false,false,true,stroke,false",
             str(later)],
            capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    log = run.stdout
    assert f"wsiseg: {SLIDE_ID}: round 1:" in log, log
    assert f"wsiseg: {SLIDE_ID}: round 2:" in log and "live round: contours replaced" in log
    assert log.count("nothing new to send") == 3, log
    assert "live mode on" in log and "live mode off" in log
    assert log.rstrip().endswith("listeners: 0"), log
    latest = json.loads((qupath_run / f"{SLIDE_ID}.geojson").read_bytes())
    after = json.loads(out.read_text())
    ai = [f for f in after if f["properties"].get("metadata", {}).get("source") == "wsiseg"]
    assert sorted(f["id"] for f in ai) == sorted(f["id"] for f in latest["features"])
    assert all(f["properties"]["isLocked"] for f in ai)
    scribbles = [f for f in after if f not in ai]
    assert len(scribbles) == 2
    assert all(f["properties"]["metadata"].get("wsiseg_sent") for f in scribbles)
    history = SlideStore.open(store.path).attrs["rounds"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[1]["scribbles"]["tumor"] == 1 and history[1]["scribbles"]["edited_ai"] == 0
    assert history[2]["scribbles"]["non_tumor"] == 1 and history[2]["scribbles"]["tumor"] == 0


def _deep_spot(store: SlideStore) -> shapely.Point:
    """A point deep inside the largest tumor focus (a Stroma disc there makes a hole)."""
    from scipy import ndimage

    guide = np.asarray(store["guide"][...])
    depth = ndimage.distance_transform_edt(np.pad(guide >= 128, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(depth), depth.shape)
    assert depth[y, x] > 25
    return shapely.Point(x, y)


def assert_the_ai_contours_are_the_servers(hierarchy: list[dict], served: dict) -> None:
    """The script's AI contours (a dump of the stand-in hierarchy) are the served round's:
    the same ids, and each feature as the server wrote it (class, geometry with its holes,
    metadata) but for the script's own hash, and locked."""
    ai = {f["id"]: f for f in hierarchy
          if f["properties"].get("metadata", {}).get("source") == "wsiseg"}
    want = {f["id"]: f for f in served["features"]}
    assert len(ai) == len([f for f in hierarchy if f["id"] in ai])  # no id twice
    assert ai.keys() == want.keys()
    for fid, f in ai.items():
        props = dict(f["properties"])
        assert props["isLocked"] is True and props["metadata"].pop("wsiseg_roi")
        assert props == want[fid]["properties"] and f["geometry"] == want[fid]["geometry"]


def test_the_live_script_follows_the_change(qupath_run, tmp_path):
    """wsiseg_live.groovy posts QuPath 0.6's own files with ?contours=changed: the first
    round imports the whole round (nothing seen yet), the next one follows the answer's
    change (removed ids gone, added features in); after another client's undo the answer
    starts from another round, and the script imports the whole round again. Each time the
    AI contours are the server's full GET /contours."""
    groovy, env = _groovy()
    store = SlideStore.open(qupath_run / f"{SLIDE_ID}.zarr")
    r0 = json.loads((qupath_run / f"{SLIDE_ID}.geojson").read_bytes())
    first = json.loads((WRITTEN / "scribbles-fc.geojson").read_bytes())["features"]
    hierarchy = tmp_path / "hierarchy.json"
    hierarchy.write_text(json.dumps(r0["features"] + first))  # as after import_wsiseg
    disc = json.loads(export_of(store, [(_deep_spot(store).buffer(12), "Stroma")]))
    second = tmp_path / "second.json"
    second.write_text(json.dumps(
        json.loads((WRITTEN / "extras-2d-fc.geojson").read_bytes())["features"]
        + disc["features"]))
    third = tmp_path / "third.json"
    third.write_text(json.dumps(
        json.loads(export_of(store, [(border_stroke(store, 2), "Tumor")]))["features"]))
    d = {k: tmp_path / f"{k}.json" for k in ("q1", "s1", "q2", "s2")}
    steps = [
        "false", f"dump={d['q1']}", f"get={d['s1']}",
        f"add={second}", "false", f"dump={d['q2']}", f"get={d['s2']}",
        "undo", f"add={third}", "false",
    ]
    out = tmp_path / "after.json"
    stub = REPO / "tests" / "fixtures" / "qupath_stub"
    with live_server(qupath_run, tmp_path / "scratch") as url:
        run = subprocess.run(
            [groovy, "-cp", str(stub), str(stub / "run_script.groovy"), str(SCRIPT),
             str(hierarchy), str(out), url, f"{SLIDE_ID}.svs", ",".join(steps)],
            capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        with client(qupath_run, tmp_path / "scratch2") as api:
            served = api.get(f"/slides/{SLIDE_ID}/contours").json()
    rounds = [line for line in run.stdout.splitlines() if f"wsiseg: {SLIDE_ID}: round" in line]
    assert len(rounds) == 3, run.stdout
    assert "round 1:" in rounds[0] and "whole round imported" in rounds[0]
    assert "round 2:" in rounds[1] and "change followed" in rounds[1]
    assert "--- undo by another client: round 1" in run.stdout
    assert "round 2:" in rounds[2] and "whole round imported" in rounds[2]
    assert_the_ai_contours_are_the_servers(json.loads(d["q1"].read_text()),
                                           json.loads(d["s1"].read_text()))
    q2, s2 = json.loads(d["q2"].read_text()), json.loads(d["s2"].read_text())
    assert_the_ai_contours_are_the_servers(q2, s2)
    after = json.loads(out.read_text())
    assert_the_ai_contours_are_the_servers(after, served)
    # The followed round made a hole (the Stroma disc), and the hierarchy has it.
    assert any(len(p.interiors) for f in s2["features"]
               for p in shapely.get_parts(shapely.geometry.shape(f["geometry"])))
    history = SlideStore.open(store.path).attrs["rounds"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(h.get("scribbles", {}).get("edited_ai", 0) == 0 for h in history)
