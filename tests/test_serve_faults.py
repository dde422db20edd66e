"""``wsiseg serve`` under faults: killed mid-round, two clients at once, fuzzed requests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsiseg.serve.queue import SlideQueues
from wsiseg.store import SlideStore

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
from storekit import assert_unchanged, store_snapshot


@pytest.fixture(scope="module")
def template(synth_slides, tmp_path_factory):
    return make_run(synth_slides[0], tmp_path_factory.mktemp("faults") / "run")


def store_of(run: Path) -> SlideStore:
    return SlideStore.open(run / f"{SLIDE_ID}.zarr")


def long_stroke(store: SlideStore) -> bytes:
    """Strokes over several refine windows, so a round lasts long enough to be killed in."""
    lines = [(border_stroke(store, k, length_px=60), "Tumor" if k % 2 else "Stroma")
             for k in range(3)]
    rows, cols = store.frame.working_shape
    lines.append((shapely.LineString([(cols * 0.2, rows * 0.5), (cols * 0.8, rows * 0.5)]),
                  "Stroma"))
    return export_of(store, lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsiseg.cli", "serve", str(run), "--refiner", "randomwalk",
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/slides", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()}")
    proc.kill()
    raise RuntimeError("server did not start")


def test_kill_9_mid_round_then_restart(template, tmp_path):
    run = copy_run(template, tmp_path / "run")
    before = store_snapshot(store_of(run), run)
    body = long_stroke(store_of(run))
    port = _free_port()
    proc = _start(run, port)
    url = f"http://127.0.0.1:{port}/slides/{SLIDE_ID}/scribbles"
    poster = threading.Thread(target=lambda: _post_quietly(url, body), daemon=True)
    poster.start()
    # Wait until the round has merged the new scribbles into the store (the run wrote none:
    # their first chunk file appears) and is refining, then kill the server without a chance
    # to clean up.
    chunks = run / f"{SLIDE_ID}.zarr" / "scribbles" / "c"
    assert not chunks.exists() or not any(chunks.rglob("*"))
    deadline = time.monotonic() + 120
    while not (chunks.exists() and any(p.is_file() for p in chunks.rglob("*"))):
        assert time.monotonic() < deadline, "the round never merged its scribbles"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    poster.join(timeout=30)

    proc = _start(run, port)  # the restarted server serves the previous round
    try:
        slide = httpx.get(f"http://127.0.0.1:{port}/slides/{SLIDE_ID}").json()
        assert slide["round"] == 0
        assert_unchanged(store_of(run), run, before)
        r = httpx.post(url, content=body, headers=GEOJSON_HEADERS, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["refined"] and r.json()["round"] == 1
    finally:
        proc.kill()
        proc.wait()


def _post_quietly(url: str, body: bytes) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        httpx.post(url, content=body, headers=GEOJSON_HEADERS, timeout=300)


def test_two_clients_on_one_slide_both_land_in_order(template, tmp_path):
    run = copy_run(template, tmp_path / "run")
    store = store_of(run)
    bodies = [export_of(store, [(border_stroke(store, k), "Tumor")]) for k in (0, 2)]
    answers: list[dict] = [{}, {}]
    with live_server(run, tmp_path / "scratch") as url:
        start = threading.Barrier(2)

        def post(k: int) -> None:
            start.wait()
            r = httpx.post(f"{url}/slides/{SLIDE_ID}/scribbles", content=bodies[k],
                           headers=GEOJSON_HEADERS, timeout=300)
            answers[k] = {"status": r.status_code, **r.json()}

        threads = [threading.Thread(target=post, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [a["status"] for a in answers] == [200, 200]
    assert sorted(a["round"] for a in answers) == [1, 2]
    history = store_of(run).attrs["rounds"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for a, body in zip(answers, bodies, strict=True):  # each round is its own body's
        assert history[a["round"]]["scribble_sha256"] == _fingerprint(body)
        assert a["previous_round"] == a["round"] - 1
    # Never interleaved: the second round started from the first one's result.
    assert history[2]["tumor_mm2_before"] == history[1]["tumor_mm2"]


def _fingerprint(body: bytes) -> str:
    digest = hashlib.sha256(str(len(body)).encode())
    digest.update(body)  # bodies are far below the fingerprint's 1 MiB head
    return digest.hexdigest()


def test_slide_queue_runs_jobs_in_arrival_order():
    import asyncio

    queues = SlideQueues()
    order: list[int] = []

    def job(k: int, seconds: float):
        def run(queued_s: float) -> int:
            time.sleep(seconds)
            order.append(k)
            return k

        return run

    async def main() -> list[int]:
        # The first job is slow: later ones must still wait for it, and keep their order.
        return await asyncio.gather(*(queues.run("a", job(k, 0.2 if k == 0 else 0.0))
                                      for k in range(5)))

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert order == [0, 1, 2, 3, 4]

    async def two_slides() -> list[int]:
        # Another slide does not wait for a slow round on the first.
        return await asyncio.gather(queues.run("a", job(10, 0.5)), queues.run("b", job(20, 0)))

    order.clear()
    assert asyncio.run(two_slides()) == [10, 20]
    assert order == [20, 10]
    queues.close()


# -- fuzz ----------------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12),
                      st.floats(allow_nan=False), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12)
coordinate = st.floats(-1e4, 1e4, allow_nan=False)
geometry = st.one_of(
    st.builds(lambda xy: {"type": "Point", "coordinates": xy},
              st.lists(coordinate, min_size=0, max_size=3)),
    st.builds(lambda pts: {"type": "LineString", "coordinates": pts},
              st.lists(st.lists(coordinate, min_size=2, max_size=2), max_size=5)),
    st.builds(lambda ring: {"type": "Polygon", "coordinates": [ring]},
              st.lists(st.lists(coordinate, min_size=2, max_size=2), max_size=6)),
    json_value,
)
feature = st.fixed_dictionaries({
    "type": st.sampled_from(["Feature", "feature", "Point"]),
    "geometry": geometry,
    "properties": st.one_of(json_value, st.fixed_dictionaries({
        "objectType": st.sampled_from(["annotation", "detection", 3]),
        "classification": st.one_of(st.sampled_from(["Tumor", "Stroma", None]), json_value),
    })),
})
bodies = st.one_of(
    st.binary(max_size=64),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.lists(feature, max_size=3).map(
        lambda fs: json.dumps({"type": "FeatureCollection", "features": fs}).encode()),
)
slide_ids = st.one_of(st.just(SLIDE_ID), st.sampled_from(["..", "%2e%2e", "s0.zarr", "a/b"]),
                      st.text(max_size=10))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(slide=slide_ids, body=bodies,
       content_type=st.sampled_from(["application/geo+json", "application/json", "text/plain",
                                     "application/zip", ""]),
       route=st.sampled_from(["scribbles", "undo", "contours", "history", "image.dzi",
                              "heatmap_files/3/0_0.png", "image_files/99/0_0.jpeg", ""]),
       round_k=st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=4)))
def test_fuzzed_requests_never_fail_the_server(fuzz_api, slide, body, content_type, route,
                                               round_k):
    api, run = fuzz_api
    before = store_snapshot(store_of(run), run)
    # Any text as an id, sent as a client sends it (percent-encoded; "/", "%", "." kept so the
    # traversal cases reach the server as written).
    slide = urllib.parse.quote(slide, safe="/%.")
    path = f"/slides/{slide}/{route}" if route else f"/slides/{slide}"
    headers = {"Content-Type": content_type} if content_type else {}
    if route in ("scribbles", "undo"):
        r = api.post(path, content=body, headers=headers)
    else:
        r = api.get(path, params={} if round_k is None else {"round": round_k})
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code >= 400:
        assert_unchanged(store_of(run), run, before)


@pytest.fixture(scope="module")
def fuzz_api(template, tmp_path_factory):
    run = copy_run(template, tmp_path_factory.mktemp("fuzz") / "run")
    with client(run, tmp_path_factory.mktemp("fuzz-scratch")) as api:
        yield api, run
