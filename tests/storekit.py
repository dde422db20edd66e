"""Test helpers: slide stores with a known probability map, and QuPath-style exports."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import shapely

from wsiseg.cohort import publish_run
from wsiseg.store import SlideStore
from wsiseg.tiling import tile_slide


def run_store(
    slide: Path, out_dir: Path, slide_id: str, workflow,
    prob: Callable[[int, int], np.ndarray],
) -> SlideStore:
    """Tile ``slide`` and publish round 0 with ``prob(rows, cols)`` (uint8) as GuideNet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = tile_slide(slide, out_dir / f"{slide_id}.zarr", workflow).store
    rows, cols = store.frame.working_shape
    p = prob(rows, cols).astype(np.uint8)
    store["guide"][...] = p
    store["refined"][...] = p
    store.set_stage("guide", "done")
    publish_run(store, out_dir, slide_id)
    return store


def blobs(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A smooth probability map with a few tumor blobs (uint8)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((rows, cols)), sigma=max(rows, cols) / 20)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
    return np.clip(noise * 255, 0, 255).astype(np.uint8)


def feature(geom: shapely.Geometry, class_name: str | None, **props) -> dict:
    """One Feature as QuPath 0.4–0.7 writes it (geometry in QuPath-frame level-0 px)."""
    properties = {"objectType": "annotation", **props}
    if class_name is not None:
        properties["classification"] = {"name": class_name, "color": [200, 0, 0]}
    return {
        "type": "Feature", "id": str(uuid.uuid4()),
        # 2 decimals like QuPath, without repairing (QuPath exports invalid polygons as drawn)
        "geometry": json.loads(shapely.to_geojson(shapely.transform(geom, _round2))),
        "properties": properties,
    }


def _round2(coords: np.ndarray) -> np.ndarray:
    return np.round(coords, 2)


def write_export(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def store_snapshot(store: SlideStore, out_dir: Path) -> dict:
    """Everything a failed refine must leave unchanged."""
    snap = {name: np.asarray(store[name][...]).copy() for name in ("guide", "refined",
                                                                    "scribbles")}
    snap["attrs"] = json.dumps(store.attrs, sort_keys=True)
    snap["files"] = {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.geojson"))
                     if ".undone-" not in p.name}  # undone rounds are kept, renamed
    return snap


def assert_unchanged(store: SlideStore, out_dir: Path, before: dict) -> None:
    after = store_snapshot(store, out_dir)
    for name in ("guide", "refined", "scribbles"):
        np.testing.assert_array_equal(after[name], before[name])
    assert after["attrs"] == before["attrs"]
    assert after["files"] == before["files"]


def one_tumor(rows: int, cols: int) -> np.ndarray:
    """A map with one tumor, a disk near the top-left corner (uint8)."""
    yy, xx = np.mgrid[:rows, :cols]
    return np.where((yy - 60) ** 2 + (xx - 60) ** 2 < 30**2, 230, 20).astype(np.uint8)


def stroke_away_from_the_tumor(store, path, k: int):
    """A small Stroma stroke on tissue as far as can be from :func:`one_tumor`'s disk."""
    from scipy import ndimage

    tissue = ndimage.binary_erosion(store.tissue_mask, iterations=3)
    rows, cols = store.frame.working_shape
    rr, cc = np.nonzero(tissue)
    y, x = (rr + 0.5) * rows / tissue.shape[0], (cc + 0.5) * cols / tissue.shape[1]
    far = np.argsort(np.hypot(y - 60, x - 60))[-1 - 5 * k]
    line = shapely.LineString([(x[far] - 5, y[far]), (x[far] + 5, y[far] + 2)])
    return write_export(path, [feature(store.frame.transform_geometry(line, "working",
                                                                      "qupath"), "Stroma")])


def refined_low(store, windows, window_px):
    """A refiner that finds no tumor in its windows."""
    return [np.full((window_px, window_px), 0.1, np.float32) for _ in windows]
