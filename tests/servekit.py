"""Test helpers for ``wsiseg serve``: a small run directory, an app on it, strokes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import shapely
from fastapi.testclient import TestClient

from wsiseg.config import load_workflow
from wsiseg.serve.main import ServeOptions, build_app
from wsiseg.store import SlideStore

from storekit import blobs, feature, run_store

SLIDE_ID = "s0"
LOCAL = "http://127.0.0.1"


def make_run(synth_slide, out_dir: Path, workflow=None, slide_id: str = SLIDE_ID) -> Path:
    """A run directory holding one slide's store and round-0 files (GuideNet: smooth blobs);
    ``workflow`` defaults to the default one with 256-px chunks (several chunks per slide)."""
    if workflow is None:
        wf = load_workflow()
        workflow = wf.replace(tiling=dataclasses.replace(wf.tiling, chunk_px=256))
    run_store(synth_slide.slide_path, out_dir, slide_id, workflow,
              lambda r, c: blobs(r, c, seed=3))
    return out_dir


def copy_run(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def client(run_dir: Path, scratch: Path, **options) -> TestClient:
    scratch.mkdir(exist_ok=True)
    opts = {"refiner": "randomwalk", **options}
    app, _, _ = build_app(ServeOptions(paths=[run_dir], **opts), scratch)
    return TestClient(app, base_url=LOCAL)


def border_stroke(store: SlideStore, k: int = 0, length_px: float = 60.0) -> shapely.LineString:
    """A working-px line across a tumor border (guide crossing 0.5) on tissue; ``k`` picks
    another border point."""
    from scipy import ndimage

    guide = np.asarray(store["guide"][...])
    rows, cols = guide.shape
    tissue = store.tissue_mask
    tr = np.minimum(np.arange(rows) * tissue.shape[0] // rows, tissue.shape[0] - 1)
    tc = np.minimum(np.arange(cols) * tissue.shape[1] // cols, tissue.shape[1] - 1)
    on = ndimage.binary_erosion(tissue, iterations=4)[np.ix_(tr, tc)]
    tumor = guide >= 128
    border = tumor & ~ndimage.binary_erosion(tumor) & on
    margin = int(length_px)
    border[:margin], border[-margin:], border[:, :margin], border[:, -margin:] = (
        False, False, False, False)
    rr, cc = np.nonzero(border)
    i = (len(rr) * (2 * k + 1)) // 7  # k = 0, 1, 2
    y, x = float(rr[i]), float(cc[i])
    gy, gx = np.gradient(guide.astype(np.float32))
    d = np.array([gx[int(y), int(x)], gy[int(y), int(x)]])
    d = d / (np.linalg.norm(d) + 1e-9)
    half = length_px / 2
    return shapely.LineString([(x - d[0] * half, y - d[1] * half),
                               (x + d[0] * half, y + d[1] * half)])


def export_of(store: SlideStore, lines: list[tuple[shapely.Geometry, str]]) -> bytes:
    """A QuPath-style FeatureCollection of working-px geometries with these classes."""
    features = [feature(store.frame.transform_geometry(g, "working", "qupath"), cls)
                for g, cls in lines]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


GEOJSON_HEADERS = {"Content-Type": "application/geo+json"}


@contextlib.contextmanager
def live_server(run_dir: Path, scratch: Path, **options) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    scratch.mkdir(exist_ok=True)
    opts = {"refiner": "randomwalk", **options}
    app, _, _ = build_app(ServeOptions(paths=[run_dir], **opts), scratch)
    # IPPROTO_TCP given: asyncio sets TCP_NODELAY only on sockets that say so (else Nagle
    # and delayed ACKs add ~40 ms to every keep-alive request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
